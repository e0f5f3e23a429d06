defmodule TrustDist.MatrixTest do
  @moduledoc """
  The carrier between real nodes of different OTP releases: this machine's OTP and the
  OTP 27 and 29 nodes of the debootstrap chroots (scripts/otp-chroot.sh), all on the same
  loopback. The Erlang code is compiled by each release's own compiler; the NIF is the
  same library everywhere.

  Skipped, with the reason, when a release's chroot has not been built (`make test`
  builds them where it can; CI does).
  """
  use ExUnit.Case, async: false

  alias TrustDist.TestCluster, as: C

  @moduletag :tmp_dir
  @moduletag :matrix

  @script Path.join(C.root(), "scripts/otp-chroot.sh")
  @host_release :erlang.system_info(:otp_release) |> List.to_string()

  # Compiles erl_src and the test probe with the release's own erlc into
  # _build/otpNN/lib/trust_dist, whose priv is the project's priv (the NIF).
  defp ebin_for(@host_release), do: C.ebin()

  defp ebin_for(release) do
    lib = Path.join(C.root(), "_build/otp#{release}/lib/trust_dist")
    ebin = Path.join(lib, "ebin")
    File.mkdir_p!(ebin)
    priv = Path.join(lib, "priv")
    unless File.exists?(priv), do: File.ln_s!(Path.join(C.root(), "priv"), priv)
    File.cp!(Path.join(C.ebin(), "trust_dist.app"), Path.join(ebin, "trust_dist.app"))

    sources =
      Path.wildcard(Path.join(C.root(), "erl_src/*.erl")) ++
        [Path.join(C.root(), "test/support/trust_dist_probe.erl")]

    {out, status} =
      System.cmd(@script, ["erlc", release, "-o", ebin | sources], stderr_to_stdout: true)

    if status != 0, do: flunk("erlc of OTP #{release} failed:\n" <> out)
    ebin
  end

  defp available?(@host_release), do: true

  defp available?(release) do
    {_, status} = System.cmd(@script, ["release", release], stderr_to_stdout: true)
    status == 0
  end

  defp start(node, @host_release), do: C.start(node)

  defp start(node, release) do
    C.start(node, exec: {@script, ["erl", release]}, ebin: ebin_for(release))
  end

  # Pairs: each release with itself, and every mixed pair with the host release.
  pairs = [{"27", "27"}, {"29", "29"}, {@host_release, "27"}, {@host_release, "29"}, {"27", "29"}]

  for {ra, rb} <- pairs do
    @tag releases: {ra, rb}
    test "OTP #{ra} <-> OTP #{rb}: ping, erpc, messages, links, monitors, GenServer.call",
         %{tmp_dir: dir, releases: {ra, rb}} do
      missing = Enum.reject([ra, rb], &available?/1)

      if missing != [] do
        IO.puts(
          "\n  matrix: OTP #{Enum.join(missing, ", ")} chroot not built; skipping OTP #{ra} <-> OTP #{rb}"
        )
      else
        run_pair(dir, ra, rb)
      end
    end
  end

  defp run_pair(dir, ra, rb) do
    {a, b} = {C.unique("a"), C.unique("b")}
    nodes = C.dev_cluster(dir, [{a, :admin}, {b, :admin}])
    pa = start(nodes[a], ra)
    pb = start(nodes[b], rb)
    on_exit(fn -> Enum.each([pa, pb], &C.stop/1) end)
    {na, nb} = {nodes[a].node, nodes[b].node}

    assert C.call(pa, :erlang, :system_info, [:otp_release]) == String.to_charlist(ra)
    assert C.call(pb, :erlang, :system_info, [:otp_release]) == String.to_charlist(rb)

    assert C.call(pa, :net_adm, :ping, [nb]) == :pong

    assert C.call(pb, :erpc, :call, [na, :erlang, :system_info, [:otp_release]]) ==
             String.to_charlist(ra)

    assert C.call(pa, :erpc, :call, [nb, :erlang, :system_info, [:otp_release]]) ==
             String.to_charlist(rb)

    echo = C.call(pb, :trust_dist_probe, :start_echo, [:echo])
    assert C.call(pa, :trust_dist_probe, :echo_roundtrip, [echo, :to_pid, 5000]) == :ok
    assert C.call(pa, :trust_dist_probe, :echo_roundtrip, [{:echo, nb}, :to_name, 5000]) == :ok
    assert C.call(pa, :trust_dist_probe, :alias_roundtrip, [nb]) == :ok
    assert C.call(pa, :trust_dist_probe, :spawn_link_remote, [nb]) == {nb, :done_remote}
    assert C.call(pa, :trust_dist_probe, :link_exit, [nb, :r1]) == {:exit, :r1}
    assert C.call(pb, :trust_dist_probe, :monitor_down, [na, :r2]) == {:down, :r2}
    C.call(pb, :trust_dist_probe, :start_server, [:probe_server])

    assert C.call(pa, :trust_dist_probe, :server_call, [:probe_server, nb, :hi]) ==
             {:pong, nb, :hi}

    for size <- [0, 1_048_576, 67_108_864] do
      assert C.call(pa, :trust_dist_probe, :transfer, [nb, size, 60_000], 90_000) == :ok
      assert C.call(pb, :trust_dist_probe, :transfer, [na, size, 60_000], 90_000) == :ok
    end

    assert C.call(pa, :trust_dist_probe, :ordered_senders, [nb, 8, 2_000], 60_000) == :ok
    assert [%{node: ^nb, mode: :full}] = C.call(pa, :trust_dist, :links, [])
  end
end
