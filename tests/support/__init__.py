"""What both test tiers share: fakes of llama.cpp and of the servers kvedge talks to, the tiny-GGUF
writer, the headless browser, the native-library probe, and running the kvedge CLI as a user would.

pytest puts tests/ on sys.path (`pythonpath` in pyproject.toml), so a test imports these as
`from support.fakes import FakeRuntimes`; fixtures live in tests/conftest.py."""
