# Nodes under test are separate BEAMs started with :peer over standard I/O; make sure an
# EPMD daemon is there for them to register their UDP ports with.
System.cmd("epmd", ["-daemon"])
ExUnit.start(timeout: 300_000)
