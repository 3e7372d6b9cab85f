"""The toolkit: beyond one run. Blend finished runs on their out-of-fold evidence, and an error-analysis page."""
