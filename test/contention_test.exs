defmodule TrustDist.ContentionTest do
  @moduledoc """
  Where a ping's time goes while a bulk transfer runs (`make contention`; not part of
  `make test`). Four nodes, A and B pinging, C and D for a transfer elsewhere, each case
  for 5 s: no bulk; 1 MiB messages from A to B on the ping's own link; the same between
  C and D, so the ping's nodes share only the machine's cores. With the pinging pair's
  threads: CPU time and time spent waiting for a core (`/proc/PID/task/TID/schedstat`)
  during the same-link case. `CONTENTION_CARRIER=inet_tcp` runs the same with Erlang's
  TCP distribution.
  """
  use ExUnit.Case, async: false

  alias TrustDist.TestCluster, as: C

  @moduletag :tmp_dir
  @moduletag :contention
  @moduletag timeout: 300_000

  @ms 5_000

  test "a ping's round trip: idle, beside a bulk transfer, and with one elsewhere", %{
    tmp_dir: dir
  } do
    carrier = System.get_env("CONTENTION_CARRIER", "trust")
    names = Enum.map(["ca", "cb", "cc", "cd"], &C.unique/1)
    {peers, [_a, b, _c, d]} = start(carrier, names, dir)
    on_exit(fn -> Enum.each(peers, &C.stop/1) end)
    [pa, pb, pc, _pd] = peers
    assert C.call(pa, :net_adm, :ping, [b]) == :pong
    assert C.call(pc, :net_adm, :ping, [d]) == :pong

    idle = C.call(pa, :trust_dist_contention, :pings, [b, @ms], 60_000)
    bulk = C.call(pa, :trust_dist_contention, :bulk, [b, 1_048_576])
    Process.sleep(500)
    before = Enum.map([pa, pb], &threads/1)
    beside = C.call(pa, :trust_dist_contention, :pings, [b, @ms], 60_000)
    after_ = Enum.map([pa, pb], &threads/1)
    bulk_rate = C.call(pa, :trust_dist_contention, :stop, [bulk])
    Process.sleep(1_000)
    other = C.call(pc, :trust_dist_contention, :bulk, [d, 1_048_576])
    Process.sleep(500)
    elsewhere = C.call(pa, :trust_dist_contention, :pings, [b, @ms], 60_000)
    other_rate = C.call(pc, :trust_dist_contention, :stop, [other])

    IO.puts("\n#{carrier}: ping round trip (µs)    n       p50       p99       max")

    for {what, r} <- [
          {"no bulk", idle},
          {"bulk on its link", beside},
          {"bulk between C, D", elsewhere}
        ] do
      IO.puts(
        "  #{String.pad_trailing(what, 22)}" <>
          Enum.map_join([r.n, r.p50_us, r.p99_us, r.max_us], &String.pad_leading("#{&1}", 10))
      )
    end

    IO.puts(
      "#{carrier}: bulk MB/s on the ping's link #{round_rate(bulk_rate)}, " <>
        "between C and D #{round_rate(other_rate)}"
    )

    IO.puts("#{carrier}: threads busy during the bulk on the ping's link (#{@ms} ms)")

    for {{t0, t1}, who} <- Enum.zip(Enum.zip(before, after_), ["A", "B"]),
        {tid, {name, cpu1, wait1}} <- t1,
        {_, cpu0, wait0} = Map.get(t0, tid, {name, 0, 0}),
        cpu1 - cpu0 > 50_000_000 do
      IO.puts(
        "  #{who} #{String.pad_trailing(name, 14)} on a core #{div(cpu1 - cpu0, 1_000_000)} ms, " <>
          "waiting for one #{div(wait1 - wait0, 1_000_000)} ms"
      )
    end

    assert idle.n > 0 and beside.n > 0 and elsewhere.n > 0
  end

  defp round_rate(rate) when is_number(rate), do: round(rate)
  defp round_rate(other), do: inspect(other)

  defp start("inet_tcp", names, _dir) do
    peers =
      for n <- names do
        {:ok, peer, _} =
          :peer.start_link(%{
            name: String.to_atom(n),
            host: ~c"127.0.0.1",
            longnames: true,
            connection: :standard_io,
            args: [~c"-pa", String.to_charlist(C.ebin())]
          })

        peer
      end

    {peers, Enum.map(names, &:"#{&1}@127.0.0.1")}
  end

  defp start(_trust, names, dir) do
    nodes = C.dev_cluster(dir, Enum.map(names, &{&1, :admin}), tiers: [:admin])
    args = String.split(System.get_env("CONTENTION_ERL_ARGS", ""))
    {Enum.map(names, &C.start(nodes[&1], args: args)), Enum.map(names, &nodes[&1].node)}
  end

  # Each thread of the node's OS process: name, ns on a core, ns runnable but waiting.
  defp threads(peer) do
    pid = C.os_pid(peer)

    for tid <- File.ls!("/proc/#{pid}/task"), into: %{} do
      name = File.read!("/proc/#{pid}/task/#{tid}/comm") |> String.trim()

      [cpu, wait | _] =
        File.read!("/proc/#{pid}/task/#{tid}/schedstat")
        |> String.split()
        |> Enum.map(&String.to_integer/1)

      {tid, {name, cpu, wait}}
    end
  end
end
