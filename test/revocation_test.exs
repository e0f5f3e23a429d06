defmodule TrustDist.RevocationTest do
  @moduledoc """
  Certificates are judged for the whole life of a link, not only when it is made: a peer
  whose key or certificate is added to the revocation list is disconnected within a
  second and cannot connect again, and a link ends when the peer's certificate expires.
  """
  use ExUnit.Case, async: false

  alias TrustDist.TestCluster, as: C

  @moduletag timeout: 60_000

  setup do
    dir = Path.join(System.tmp_dir!(), C.unique("revocation"))
    on_exit(fn -> File.rm_rf(dir) end)
    {:ok, dir: dir}
  end

  defp pair(dir) do
    a = C.unique("reva")
    b = C.unique("revb")
    nodes = C.dev_cluster(dir, [{a, :admin}, {b, :worker}], tiers: [:admin, :worker])
    revoked = Path.join(dir, "revoked.list")
    File.write!(revoked, "# nothing revoked yet\n")
    C.put_config(nodes[a].dir, revoked: String.to_charlist(revoked))
    {nodes[a], nodes[b], revoked}
  end

  defp start(spec) do
    peer = C.start(spec)
    on_exit(fn -> C.stop(peer) end)
    peer
  end

  defp connected?(peer, node), do: node in C.call(peer, :erlang, :nodes, [:hidden])

  test "trust-dist revoke disconnects a connected peer within a second; it cannot come back", %{
    dir: dir
  } do
    {a, b, revoked} = pair(dir)
    pa = start(a)
    _pb = start(b)
    assert C.call(pa, :net_adm, :ping, [b.node]) == :pong
    [link] = C.call(pa, :trust_dist, :links, [])
    assert link.node == b.node

    # The operator's command, as docs/operations.md gives it.
    t0 = System.monotonic_time(:millisecond)

    {_, 0} =
      System.cmd(C.cli(), [
        "revoke",
        revoked,
        "--key",
        link.fingerprint,
        "--comment",
        "#{b.node} was compromised"
      ])

    assert C.eventually(fn -> not connected?(pa, b.node) end, 3_000)
    elapsed = System.monotonic_time(:millisecond) - t0
    IO.puts("revoked peer disconnected after #{elapsed} ms")
    assert elapsed <= 1_000, "disconnected only after #{elapsed} ms"

    assert C.call(pa, :net_adm, :ping, [b.node]) == :pang
    assert C.call(pa, :trust_dist, :reload_revocations, []) == {:ok, 1}
  end

  test "a revoked certificate serial is refused; a broken list keeps the old one in force",
       %{dir: dir} do
    {a, b, revoked} = pair(dir)
    pa = start(a)
    _pb = start(b)
    assert C.call(pa, :net_adm, :ping, [b.node]) == :pong
    [link] = C.call(pa, :trust_dist, :links, [])

    File.write!(revoked, "serial #{link.issuer} #{link.serial}\n")
    assert C.call(pa, :trust_dist, :reload_revocations, []) == {:ok, 1}
    assert C.eventually(fn -> not connected?(pa, b.node) end, 1_000)
    assert C.call(pa, :net_adm, :ping, [b.node]) == :pang

    File.write!(revoked, "this is not a revocation list\n")
    assert {:error, why} = C.call(pa, :trust_dist, :reload_revocations, [])
    assert to_string(why) =~ "line 1"
    assert C.call(pa, :net_adm, :ping, [b.node]) == :pang, "the previous list stays in force"
  end

  test "a link ends when the peer's certificate expires", %{dir: dir} do
    {a, b, _revoked} = pair(dir)
    # b's certificate: valid for a few seconds from now.
    expires = System.os_time(:second) + 5
    name = b.node |> Atom.to_string()

    {_, 0} =
      System.cmd(C.cli(), [
        "node",
        "new",
        name,
        "--tier",
        "worker",
        "--authority",
        Path.join(dir, "authority"),
        "--out",
        b.dir,
        "--not-after",
        "#{expires}",
        "--force"
      ])

    pa = start(a)
    _pb = start(b)
    assert C.call(pa, :net_adm, :ping, [b.node]) == :pong
    assert [%{not_after: ^expires}] = C.call(pa, :trust_dist, :links, [])

    assert C.eventually(fn -> not connected?(pa, b.node) end, 10_000)
    ended = System.os_time(:second)
    assert ended >= expires, "ended at #{ended}, before the certificate expired at #{expires}"
    assert ended <= expires + 2
    assert C.call(pa, :net_adm, :ping, [b.node]) == :pang
  end
end
