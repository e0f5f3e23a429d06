defmodule TrustDist.TelemetryTest do
  @moduledoc """
  The `:telemetry` bridge: link up, link down and denials are emitted through
  `telemetry:execute/3` when that function is loaded, and nothing happens when it is not
  (the other suites run without it).
  """
  use ExUnit.Case, async: false

  alias TrustDist.TestCluster, as: C

  @moduletag timeout: 60_000

  test "link up, denied and link down events reach telemetry" do
    dir = Path.join(System.tmp_dir!(), C.unique("telemetry"))
    on_exit(fn -> File.rm_rf(dir) end)
    a = C.unique("tela")
    b = C.unique("telb")
    nodes = C.dev_cluster(dir, [{a, :admin}, {b, :worker}], tiers: [:admin, :worker])
    pa = C.start(nodes[a])
    pb = C.start(nodes[b])
    on_exit(fn -> Enum.each([pa, pb], &C.stop/1) end)
    an = nodes[a].node
    bn = nodes[b].node

    :ok = C.call(pa, :trust_dist_probe, :telemetry_start, [])
    assert C.call(pa, :net_adm, :ping, [bn]) == :pong
    # worker tries to run code on admin: refused, and reported.
    assert {:error, {:erpc, :notsup}} =
             C.call(pb, :trust_dist_probe, :try_erpc, [an, :os, :getpid, []]) |> elem(0)

    assert C.call(pa, :erlang, :disconnect_node, [bn])

    events =
      C.eventually(fn ->
        events = C.call(pa, :trust_dist_probe, :telemetry_events, [])
        if Enum.any?(events, &match?({[:trust_dist, :link, :down], _, _}, &1)), do: events
      end)

    assert events, "no link down event"

    assert [{_, %{system_time: _}, %{peer: ^bn, mode: :restricted, fingerprint: "SHA256:" <> _}}] =
             for(e = {[:trust_dist, :link, :up], _, _} <- events, do: e)

    assert [{_, %{count: 1}, %{peer: ^bn, op: :spawn_request, reason: :spawn_denied}} | _] =
             for(e = {[:trust_dist, :denied], _, _} <- events, do: e)

    assert [{_, %{duration_ms: ms, bytes_in: bytes}, %{peer: ^bn}}] =
             for(e = {[:trust_dist, :link, :down], _, _} <- events, do: e)

    assert ms >= 0 and bytes > 0
  end
end
