"""The app: Ray Serve deployments, the HTTP API (TGI/LoRAX and OpenAI), admin routes, auth, metrics, launch.

It reaches the engine only through `serve.engine`'s public API and the adapter catalog through
`serve.registry`. The Serve config's import path is `serve.app.builder:app_builder`.
"""
