"""The built-in pipeline stages, one module each: its settings model, its factory and its hookimpl.

They are registered through ``resilient_cache_register_stages`` exactly like a third-party stage
(see :data:`resilient_cache.plugins.BUILTIN_PLUGINS`). docs/stages.md describes each one.
"""
