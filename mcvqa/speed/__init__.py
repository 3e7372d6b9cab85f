"""The speed wing: image-feature cache, batch replay, shared-prefix TTA, fast vision attention, and their
run-time self-checks. Plugged into the core stages through the feature cache object."""
