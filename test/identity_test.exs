defmodule TrustDist.IdentityTest do
  @moduledoc """
  Peers that cannot prove who they are never reach the VM: the refusal is logged with
  its cause on both sides, no connection appears in `nodes/1`, and the nodes keep
  serving their good links. (The transport-level cases that need a hand-built peer,
  such as a tampered certificate or a certificate for another key, are in the net
  crate's tests.)
  """
  use ExUnit.Case, async: false

  alias TrustDist.TestCluster, as: C

  @moduletag :tmp_dir

  defp logs(peer), do: C.call(peer, :trust_dist_probe, :logs, []) |> Enum.join("\n")

  defp no_connections(peer) do
    C.call(peer, :erlang, :nodes, [[:visible, :hidden]]) == [] and
      C.call(peer, :trust_dist, :links, []) == []
  end

  test "a certificate from an authority we do not trust is refused both ways", %{tmp_dir: dir} do
    a = C.unique("a")
    x = C.unique("x")
    ours = C.dev_cluster(Path.join(dir, "ours"), [{a, :admin}])
    theirs = C.dev_cluster(Path.join(dir, "theirs"), [{x, :admin}])
    pa = C.start(ours[a])
    px = C.start(theirs[x])
    on_exit(fn -> Enum.each([pa, px], &C.stop/1) end)
    for p <- [pa, px], do: :ok = C.call(p, :trust_dist_probe, :capture_logs, [])

    assert C.call(pa, :net_adm, :ping, [theirs[x].node]) == :pang
    # a's attempt named a, but nothing of it reached x's VM: the atom does not exist there.
    a_name = Atom.to_charlist(ours[a].node)
    refute C.call(px, :trust_dist_probe, :atom_exists, [a_name])
    assert C.call(px, :net_adm, :ping, [ours[a].node]) == :pang

    assert C.eventually(fn -> logs(pa) =~ "not among the configured authorities" end),
           "a did not log the cause: " <> logs(pa)

    assert C.eventually(fn -> logs(px) =~ "not among the configured authorities" end),
           "x did not log the cause: " <> logs(px)

    assert no_connections(pa) and no_connections(px)
  end

  test "a node that answers for another name is refused before the handshake", %{tmp_dir: dir} do
    [a, b, c] = for n <- ~w(a b c), do: C.unique(n)
    nodes = C.dev_cluster(dir, [{a, :admin}, {b, :admin}, {c, :admin}])
    pc = C.start(nodes[c])
    on_exit(fn -> C.stop(pc) end)

    c_port =
      C.call(pc, :trust_dist_nif, :local_port, [C.call(pc, :trust_dist_server, :carrier, [])])

    # a is told that b lives where c listens: c's certificate must not pass for b.
    C.put_config(nodes[a].dir, ports: %{nodes[b].node => c_port})
    pa = C.start(nodes[a])
    on_exit(fn -> C.stop(pa) end)
    :ok = C.call(pa, :trust_dist_probe, :capture_logs, [])

    assert C.call(pa, :net_adm, :ping, [nodes[b].node]) == :pang

    assert C.eventually(fn ->
             logs(pa) =~ ~s(is for "#{nodes[c].node}", but we dialled "#{nodes[b].node}")
           end),
           "a did not log the name mismatch: " <> logs(pa)

    assert no_connections(pa) and no_connections(pc)
    # The real c is still reachable under its own name.
    assert C.call(pa, :net_adm, :ping, [nodes[c].node]) == :pong
  end
end
