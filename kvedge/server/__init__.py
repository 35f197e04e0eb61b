"""Audits of running servers: llama-server, llama-cpp-python's server, Ollama, any OpenAI-compatible
endpoint (`kvedge audit --server URL`). The same prompts, detector, statistics, store and reports as an
in-process audit; the answers come from what is really deployed.

`spec` parses what the user says about a server, `client` speaks HTTP with retries, `flavors` knows each
server kind's API, `probe` asks a server what it is and checks it against the audited GGUF, `plan` maps
servers to the audit's runs, `runtime` answers those runs through the servers, `prepare` ties these
together before an audit and `annotate` adds the servers to its report (rendered by kvedge.report.server). docs/server.md has the whole story.
"""

from .spec import ServerSpec, parse_servers

__all__ = ["ServerSpec", "parse_servers"]
