defmodule TrustDist.ResilienceTest do
  @moduledoc """
  Node-down detection, reconnection of a restarted peer, a same-tier cluster with
  `global` and `pg`, and a link that receives garbage closing alone.
  """
  use ExUnit.Case, async: false

  alias TrustDist.TestCluster, as: C

  @moduletag :tmp_dir
  @ticktime 4

  test "kill -9 of a peer gives nodedown within net_ticktime; its restart reconnects",
       %{tmp_dir: dir} do
    {a, b} = {C.unique("a"), C.unique("b")}
    nodes = C.dev_cluster(dir, [{a, :admin}, {b, :admin}])
    tick = ["-kernel", "net_ticktime", "#{@ticktime}"]
    pa = C.start(nodes[a], args: tick)
    pb = C.start(nodes[b], args: tick, link: false)
    on_exit(fn -> C.stop(pa) end)
    nb = nodes[b].node

    :ok = C.call(pa, :trust_dist_probe, :watch_nodes, [])
    assert C.call(pa, :net_adm, :ping, [nb]) == :pong
    old_pid = C.call(pa, :trust_dist_probe, :remote_pid, [nb, :park])

    System.cmd("kill", ["-9", "#{C.os_pid(pb)}"])
    killed_at = System.monotonic_time(:millisecond)
    deadline_ms = @ticktime * 1000 + 1500
    result = C.call(pa, :trust_dist_probe, :await_nodedown, [nb, 30_000], 60_000)
    detected_ms = System.monotonic_time(:millisecond) - killed_at
    assert {:ok, _, _reason} = result

    assert detected_ms <= deadline_ms,
           "nodedown after #{detected_ms} ms, net_ticktime #{@ticktime} s"

    assert C.call(pa, :erlang, :nodes, []) == []

    pb2 = C.start(nodes[b], args: tick)
    on_exit(fn -> C.stop(pb2) end)
    assert C.call(pa, :net_adm, :ping, [nb]) == :pong
    assert C.call(pa, :erlang, :nodes, []) == [nb]
    # A pid of the killed incarnation is dead, though the node name is back.
    assert {:down, reason} = C.call(pa, :trust_dist_probe, :pid_status, [old_pid, 2000])
    assert reason in [:noproc, :noconnection]
  end

  test "a three-node cluster of one tier shares global names and pg groups", %{tmp_dir: dir} do
    names = for n <- ~w(a b c), do: C.unique(n)
    nodes = C.dev_cluster(dir, Enum.map(names, &{&1, :worker}))
    peers = for n <- names, do: C.start(nodes[n], args: ["-kernel", "start_pg", "true"])
    on_exit(fn -> Enum.each(peers, &C.stop/1) end)
    [pa, pb, pc] = peers
    [na, nb, nc] = Enum.map(names, &nodes[&1].node)

    assert C.call(pa, :net_adm, :ping, [nb]) == :pong
    assert C.call(pa, :net_adm, :ping, [nc]) == :pong
    # Full mesh: b and c connect to each other transitively, as with inet_tcp_dist.
    assert C.eventually(fn ->
             Enum.sort(C.call(pb, :erlang, :nodes, [])) == Enum.sort([na, nc])
           end)

    pid = C.call(pc, :trust_dist_probe, :global_pg, [:trust_dist_global_name])

    for p <- [pa, pb, pc] do
      assert C.eventually(fn ->
               C.call(p, :global, :whereis_name, [:trust_dist_global_name]) == pid
             end)

      assert C.eventually(fn -> C.call(p, :pg, :get_members, [:trust_dist_group]) == [pid] end)
    end
  end

  test "garbage on an authenticated link closes that link only", %{tmp_dir: dir} do
    names = for n <- ~w(a b c), do: C.unique(n)
    nodes = C.dev_cluster(dir, Enum.map(names, &{&1, :admin}))
    peers = for n <- names, do: C.start(nodes[n], args: ["-connect_all", "false"])
    on_exit(fn -> Enum.each(peers, &C.stop/1) end)
    [pa, pb, pc] = peers
    [na, nb, nc] = Enum.map(names, &nodes[&1].node)

    :ok = C.call(pa, :trust_dist_probe, :watch_nodes, [])
    assert C.call(pa, :net_adm, :ping, [nb]) == :pong
    assert C.call(pa, :net_adm, :ping, [nc]) == :pong
    echo = C.call(pc, :trust_dist_probe, :start_echo, [:echo])

    garbage = :crypto.strong_rand_bytes(4096)
    assert C.call(pb, :trust_dist_probe, :inject_garbage, [na, garbage]) in [:ok, :busy]

    assert {:ok, _, _} = C.call(pa, :trust_dist_probe, :await_nodedown, [nb, 10_000], 15_000)
    # a is alive and its link to c still works.
    assert C.call(pa, :erlang, :nodes, []) == [nc]
    assert C.call(pa, :trust_dist_probe, :echo_roundtrip, [echo, :still_here, 5000]) == :ok
    assert C.call(pa, :erpc, :call, [nc, :erlang, :node, []]) == nc
    _ = pc
  end
end
