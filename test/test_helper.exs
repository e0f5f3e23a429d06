# Nodes under test are separate BEAMs started with :peer over standard I/O; make sure an
# EPMD daemon is there for them to register their UDP ports with.
System.cmd("epmd", ["-daemon"])
# The fault-injection suite needs root and network namespaces: `make faults` runs it alone
# (mix test --only faults).
ExUnit.start(timeout: 300_000, exclude: [:faults, :contention])
