defmodule TrustDist.OrderingTest do
  @moduledoc """
  Signals between each pair of processes arrive in the order sent, under concurrent load
  with small and bulk messages interleaved, in both directions of a full link and down a
  restricted one: messages to a pid, a registered name and an alias of one receiver in
  sequence; a sender's exit and DOWN after its last message (also a DOWN that names the
  sender by its registered name); a spawn reply before the child's first message.

  Whatever the carrier does to keep small messages from waiting behind bulk data, these
  must keep passing.
  """
  use ExUnit.Case, async: false

  alias TrustDist.TestCluster, as: C

  @moduletag :tmp_dir
  @moduletag timeout: 240_000

  @load %{senders: 8, receivers: 8, count: 2000, monitor: true}

  setup %{tmp_dir: dir} do
    [a, b, w] = Enum.map(["ord_a", "ord_b", "ord_w"], &C.unique/1)

    nodes = C.dev_cluster(dir, [{a, :admin}, {b, :admin}, {w, :worker}], tiers: [:admin, :worker])

    peers = Enum.map([a, b, w], &C.start(nodes[&1]))
    on_exit(fn -> Enum.each(peers, &C.stop/1) end)
    [pa, pb, pw] = peers
    %{pa: pa, pb: pb, pw: pw, a: nodes[a].node, b: nodes[b].node, w: nodes[w].node}
  end

  defp pairs(peer, remote, load \\ @load) do
    Task.async(fn -> C.call(peer, :trust_dist_order, :pairs, [remote, load, 150_000], 160_000) end)
  end

  defp assert_pairs(task, what) do
    case Task.await(task, 170_000) do
      {:ok, %{messages: n} = stats} ->
        IO.puts("#{what}: #{n} messages, #{div(stats.bytes, 1_048_576)} MiB, in order")

      {:error, violations} ->
        flunk("#{what}: reordered signals: #{inspect(violations, limit: 30)}")
    end
  end

  test "full link, both directions at once: every pair in order", %{pa: pa, pb: pb, a: a, b: b} do
    assert C.call(pa, :net_adm, :ping, [b]) == :pong
    ab = pairs(pa, b)
    ba = pairs(pb, a)
    assert_pairs(ab, "a -> b")
    assert_pairs(ba, "b -> a")
    # Senders whose lane another's 256 KiB messages took moved off it (whether any pid
    # of the eight shared a lane is up to each link's random salt).
    moves = for p <- [pa, pb], l <- C.call(p, :trust_dist, :links, []), do: l.lane_moves
    IO.puts("lane moves (a's link, b's link): #{inspect(moves)}")
  end

  test "full link: DOWN by registered name and spawn replies come after what preceded them",
       %{pa: pa, pb: pb, a: a, b: b} do
    # Under bulk load from another pair, so that packets of all sizes are in flight.
    load = pairs(pb, a, %{@load | count: 1000})
    assert C.call(pa, :trust_dist_order, :name_monitor_exits, [b, 32, 60_000], 70_000) == :ok
    assert C.call(pa, :trust_dist_order, :spawn_replies, [b, 200, 60_000], 70_000) == :ok
    assert C.call(pb, :trust_dist_order, :name_monitor_exits, [a, 32, 60_000], 70_000) == :ok
    assert_pairs(load, "b -> a (background)")
  end

  test "a small sender is not starved by a bulk sender on the same link", %{pa: pa, b: b} do
    assert C.call(pa, :net_adm, :ping, [b]) == :pong
    # A bulk sender keeps the connection busy, so ERTS suspends every sender on it; the
    # pinger must still be resumed and get through, again and again.
    {pings, max_us, mb} =
      C.call(pa, :trust_dist_order, :ping_under_bulk, [b, 1_048_576, 3_000], 60_000)

    IO.puts(
      "ping under 1 MiB bulk: #{pings} round trips in 3 s, slowest #{div(max_us, 1000)} ms, bulk #{mb} MB"
    )

    assert pings >= 5, "only #{pings} round trips in 3 s while bulk data flowed"
    # Generous for a loaded 2-core machine; a starved pinger waits as long as the bulk lasts.
    assert max_us < 2_000_000, "a round trip took #{div(max_us, 1000)} ms behind bulk data"
    assert mb > 0
  end

  test "restricted link (admin over worker): every pair in order, DOWN by name, spawn replies",
       %{pa: pa, pw: pw, w: w} do
    assert C.call(pa, :net_adm, :ping, [w]) == :pong
    [link] = C.call(pa, :trust_dist, :links, [])
    assert link.mode == :restricted
    load = pairs(pa, w)
    assert C.call(pa, :trust_dist_order, :name_monitor_exits, [w, 32, 60_000], 70_000) == :ok
    assert C.call(pa, :trust_dist_order, :spawn_replies, [w, 200, 60_000], 70_000) == :ok
    assert_pairs(load, "admin -> worker")
    # Nothing the worker sent back was refused: the checks above only used what the
    # admin handed it.
    [link] = C.call(pa, :trust_dist, :links, [])

    refused =
      for {_op, c} <- link.counters, {k, n} <- c, k in [:dropped, :answered, :closed], do: n

    assert Enum.sum(refused) == 0, inspect(link.counters)
    _ = pw
  end
end
