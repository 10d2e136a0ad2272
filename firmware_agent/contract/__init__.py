"""What the agent and the aggregator share, and all the aggregator imports of the agent.

The messages the agent publishes and their JSON Schemas (:mod:`.messages`, ``schemas/``), the
signing-key file both programs keep (:mod:`.signing`), the error tree (:mod:`.errors`), and the
machinery both command lines use: settings resolution (:mod:`.resolve`), check tables
(:mod:`.checks`) and subprocess calls (:mod:`.command_line`). Nothing here imports numba, scapy or
any stage of the agent (``import-linter`` holds that, see ``pyproject.toml``).
"""
