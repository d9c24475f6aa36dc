"""portagent.wire: the rules the agent and the broker share (portagent-wire).

Everything here is pure: the signed envelope (signature check, size and field limits,
canonical decoding), port ranges, grant sources, durations, timestamps, the error tree
and the typed TOML reader. It imports neither the agent nor the broker.
"""
