defmodule TrustDist.CarrierTest do
  @moduledoc """
  Distributed Erlang over the trust_dist carrier between real BEAM nodes on loopback:
  every feature an OTP user relies on, large and many messages, node-down detection
  and reconnection.
  """
  use ExUnit.Case, async: false
  import Bitwise

  alias TrustDist.TestCluster, as: C

  @moduletag :tmp_dir

  setup %{tmp_dir: dir} do
    {a, b} = {C.unique("a"), C.unique("b")}
    nodes = C.dev_cluster(dir, [{a, :admin}, {b, :admin}])
    pa = C.start(nodes[a])
    pb = C.start(nodes[b])
    on_exit(fn -> Enum.each([pa, pb], &C.stop/1) end)
    %{pa: pa, pb: pb, a: nodes[a].node, b: nodes[b].node, nodes: nodes, names: {a, b}}
  end

  test "ping, sends to pid, registered name and alias", %{pa: pa, pb: pb, a: a, b: b} do
    assert C.call(pa, :net_adm, :ping, [b]) == :pong
    assert C.call(pa, :erlang, :nodes, []) == [b]
    assert C.call(pb, :erlang, :nodes, []) == [a]

    echo = C.call(pb, :trust_dist_probe, :start_echo, [:echo])
    assert node(echo) == b
    assert C.call(pa, :trust_dist_probe, :echo_roundtrip, [echo, :to_pid, 5000]) == :ok
    assert C.call(pa, :trust_dist_probe, :echo_roundtrip, [{:echo, b}, :to_name, 5000]) == :ok
    assert C.call(pa, :trust_dist_probe, :alias_roundtrip, [b]) == :ok
  end

  test "erpc, rpc, spawn_link and GenServer.call", %{pa: pa, pb: pb, b: b} do
    assert {^b, ^b, {:EXIT, {{:exception, :boom, _}, _}}} =
             C.call(pa, :trust_dist_probe, :rpc_and_erpc, [b])

    assert C.call(pa, :trust_dist_probe, :spawn_link_remote, [b]) == {b, :done_remote}
    C.call(pb, :trust_dist_probe, :start_server, [:probe_server])

    assert C.call(pa, :trust_dist_probe, :server_call, [:probe_server, b, :hello]) ==
             {:pong, b, :hello}
  end

  test "links and monitors deliver the right EXIT and DOWN reasons", %{pa: pa, b: b} do
    assert C.call(pa, :trust_dist_probe, :link_exit, [b, :link_reason]) == {:exit, :link_reason}
    assert C.call(pa, :trust_dist_probe, :monitor_down, [b, :mon_reason]) == {:down, :mon_reason}
    assert C.call(pa, :trust_dist_probe, :monitor_noproc, [b]) == {:down, :noproc}
  end

  test "messages of 0 B, 1 MiB, 64 MiB and 200 MiB arrive intact", %{pa: pa, b: b} do
    for size <- [0, 1 <<< 20, 64 <<< 20, 200 <<< 20] do
      assert C.call(pa, :trust_dist_probe, :transfer, [b, size, 120_000], 180_000) == :ok,
             "transfer of #{size} bytes"
    end
  end

  test "10,000 messages from each of 8 senders arrive in per-sender order", %{pa: pa, b: b} do
    assert C.call(pa, :trust_dist_probe, :ordered_senders, [b, 8, 10_000], 120_000) == :ok
  end

  test "a sender faster than the link is held back, not buffered without bound",
       %{pa: pa, b: b} do
    assert C.call(pa, :net_adm, :ping, [b]) == :pong
    base = C.call(pa, :erlang, :memory, [:total])
    result = C.call(pa, :trust_dist_probe, :flood, [b, 3000, 4], 60_000)
    # Four senders that would enqueue gigabytes per second are suspended by the VM's
    # busy-distribution mechanism once the carrier stops taking data.
    assert result.busy_events > 0
    assert result.peak_memory - base < 256 * 1024 * 1024, inspect(result)
    assert result.received > 64 * 1024 * 1024
    assert C.call(pa, :net_adm, :ping, [b]) == :pong
  end

  test "two nodes dialling each other at the same moment end with one connection",
       %{pa: pa, pb: pb, a: a, b: b} do
    for p <- [pa, pb], do: :ok = C.call(p, :trust_dist_probe, :capture_logs, [])

    for _ <- 1..12 do
      at = System.system_time(:millisecond) + 200
      ta = Task.async(fn -> C.call(pa, :trust_dist_probe, :ping_at, [b, at]) end)
      tb = Task.async(fn -> C.call(pb, :trust_dist_probe, :ping_at, [a, at]) end)

      assert {Task.await(ta), Task.await(tb)} == {:pong, :pong},
             "logs of a:\n#{Enum.join(C.call(pa, :trust_dist_probe, :logs, []), "\n")}\n" <>
               "logs of b:\n#{Enum.join(C.call(pb, :trust_dist_probe, :logs, []), "\n")}"

      assert C.call(pa, :erlang, :nodes, []) == [b]
      assert C.eventually(fn -> length(C.call(pa, :trust_dist, :links, [])) == 1 end)
      assert C.eventually(fn -> length(C.call(pb, :trust_dist, :links, [])) == 1 end)
      C.call(pa, :erlang, :disconnect_node, [b])
      assert C.eventually(fn -> C.call(pb, :erlang, :nodes, []) == [] end)
    end
  end

  test "introspection lists the link with identity, tier, mode and counters",
       %{pa: pa, pb: pb, a: a, b: b} do
    assert C.call(pa, :net_adm, :ping, [b]) == :pong
    assert [link] = C.call(pa, :trust_dist, :links, [])
    assert link.node == b
    assert link.certified_as == Atom.to_string(b)
    assert link.tier == "admin"
    assert link.mode == :full
    assert "SHA256:" <> _ = link.fingerprint
    assert link.packets_in > 0 and link.packets_out > 0
    assert link.bytes_in > 0 and link.bytes_out > 0
    # A link that carried only ordinary traffic keeps all its lanes.
    assert link.lanes == 32
    assert link.reopenings == 0
    assert [%{node: ^a}] = C.call(pb, TrustDist, :links, [])
  end
end
