"""Front ends that serve RLM runs to other programs: an MCP server and an OpenAI-compatible endpoint.

    rlm mcp                  MCP over stdio (coding agents, desktop assistants)
    rlm mcp --http PORT      MCP over streamable HTTP on 127.0.0.1
    rlm api --port 8765      POST /v1/chat/completions with model "rlm:<root model>"

Both check every request against one schema (`rlm.frontends.schema`: what a request may
ask for and the caps it is held to), run each request as its own `RLM_REPL` with its own
REPL worker at the server's sandbox level (`rlm.frontends.runs`), and cancel a run, closing
its worker, when the caller goes away. They need extras: `pip install 'rlm[mcp]'` for
`rlm mcp`, `pip install 'rlm[api]'` for `rlm api`.
"""
