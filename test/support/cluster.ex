defmodule TrustDist.TestCluster do
  @moduledoc """
  Real multi-node deployments for tests: `bin/trust-dist dev-cluster` writes keys,
  certificates and configs at test time, and each node is a separate BEAM started with
  `:peer` over a standard-I/O control channel, so the test runner itself needs no
  distribution and a broken carrier shows up as a failed assertion, not a hang.
  """

  @root Path.expand("../..", __DIR__)

  def root, do: @root
  def cli, do: Path.join(@root, "bin/trust-dist")

  def ebin do
    Path.join(@root, "_build/#{Mix.env()}/lib/trust_dist/ebin")
  end

  @doc "A unique node-name prefix, so parallel and repeated runs never clash in EPMD."
  def unique(name), do: "#{name}#{System.unique_integer([:positive])}"

  @doc """
  Writes a deployment for `nodes` (`[{name, tier}]`, host 127.0.0.1 or `opts[:host]`; an
  entry `{name, tier, host}` names its own host) into `dir` and returns a map of
  name => %{node:, dir:, args:}.
  """
  def dev_cluster(dir, nodes, opts \\ []) do
    nodes = Enum.map(nodes, &with_host(&1, opts))
    specs = Enum.map(nodes, fn {name, tier, host} -> "#{name}@#{host}:#{tier}" end)
    tiers = Keyword.get(opts, :tiers)
    extra = if tiers, do: ["--tiers", Enum.join(tiers, ",")], else: []

    {out, 0} =
      System.cmd(cli(), ["dev-cluster", dir | specs] ++ extra ++ ["--ebin", ebin()],
        stderr_to_stdout: true
      )

    _ = out

    Map.new(nodes, fn {name, _tier, host} ->
      node_dir = Path.join(dir, to_string(name))
      {name, %{node: :"#{name}@#{host}", dir: node_dir, args: vm_args(node_dir)}}
    end)
  end

  defp with_host({name, tier}, opts), do: {name, tier, Keyword.get(opts, :host, "127.0.0.1")}
  defp with_host({_name, _tier, _host} = node, _opts), do: node

  @doc "The arguments of a node's vm.args, without its -name (peer sets the name)."
  def vm_args(node_dir) do
    Path.join(node_dir, "vm.args")
    |> File.read!()
    |> String.split("\n", trim: true)
    |> Enum.reject(&String.starts_with?(&1, ["#", "-name ", "-sname "]))
    |> Enum.flat_map(&String.split(&1, " ", parts: 2))
  end

  @doc "Adds or replaces keys of the trust_dist section of a node's sys.config."
  def put_config(node_dir, entries) do
    path = Path.join(node_dir, "sys.config")
    {:ok, [config]} = :file.consult(String.to_charlist(path))
    section = Keyword.merge(Keyword.get(config, :trust_dist, []), entries)
    config = Keyword.put(config, :trust_dist, section)
    File.write!(path, :io_lib.format(~c"~tp.~n", [config]))
  end

  @doc """
  Starts a node of the deployment. Options: `:args` (extra emulator args), `:exec`
  (`{program, args}` to run another OTP, see scripts/otp-chroot.sh), `:ebin` (override),
  `:link` (false for a node the test will kill).
  """
  def start(%{node: node, args: args}, opts \\ []) do
    [name, host] = node |> Atom.to_string() |> String.split("@")
    args = maybe_replace_ebin(args, Keyword.get(opts, :ebin))
    all_args = Enum.map(args ++ Keyword.get(opts, :args, []), &String.to_charlist/1)

    peer_opts =
      %{
        name: String.to_atom(name),
        host: String.to_charlist(host),
        longnames: true,
        connection: :standard_io,
        args: all_args,
        wait_boot: Keyword.get(opts, :wait_boot, 20_000)
      }
      |> maybe_exec(Keyword.get(opts, :exec))

    start = if Keyword.get(opts, :link, true), do: &:peer.start_link/1, else: &:peer.start/1
    {:ok, peer, ^node} = start.(peer_opts)
    peer
  end

  defp maybe_exec(peer_opts, nil), do: peer_opts

  defp maybe_exec(peer_opts, {prog, args}),
    do:
      Map.put(peer_opts, :exec, {String.to_charlist(prog), Enum.map(args, &String.to_charlist/1)})

  defp maybe_replace_ebin(args, nil), do: args

  defp maybe_replace_ebin(args, ebin) do
    Enum.map(args, fn arg -> if arg == ebin(), do: ebin, else: arg end)
  end

  @doc "Runs `m.f(a)` on the node behind `peer`."
  def call(peer, m, f, a, timeout \\ 30_000), do: :peer.call(peer, m, f, a, timeout)

  def stop(peer) do
    try do
      :peer.stop(peer)
    catch
      _, _ -> :ok
    end
  end

  @doc "The OS pid of the node behind `peer`."
  def os_pid(peer), do: call(peer, :os, :getpid, []) |> List.to_integer()

  @chroot_script Path.join(@root, "scripts/otp-chroot.sh")
  @host_release :erlang.system_info(:otp_release) |> List.to_string()

  @doc "The OTP major release of the test runner (and of plain `start/2` nodes)."
  def host_release, do: @host_release

  @doc """
  Whether nodes of OTP `release` can be started: the host's release always, another one
  when its debootstrap chroot (scripts/otp-chroot.sh) has been built.
  """
  def release_available?(@host_release), do: true

  def release_available?(release) do
    {_, status} = System.cmd(@chroot_script, ["release", release], stderr_to_stdout: true)
    status == 0
  end

  @doc """
  The code path for nodes of OTP `release`: erl_src and the Erlang test support (probe,
  attacker) compiled by that release's own erlc into _build/otpNN/lib/trust_dist/ebin
  (priv is the project's, so the NIF is the same library). The host release uses the Mix
  build.
  """
  def release_ebin(@host_release), do: ebin()

  def release_ebin(release) do
    lib = Path.join(@root, "_build/otp#{release}/lib/trust_dist")
    ebin = Path.join(lib, "ebin")
    File.mkdir_p!(ebin)
    priv = Path.join(lib, "priv")
    unless File.exists?(priv), do: File.ln_s!(Path.join(@root, "priv"), priv)
    File.cp!(Path.join(ebin(), "trust_dist.app"), Path.join(ebin, "trust_dist.app"))

    sources =
      Path.wildcard(Path.join(@root, "erl_src/*.erl")) ++
        Enum.map(
          ~w(trust_dist_probe trust_dist_attacker),
          &Path.join(@root, "test/support/#{&1}.erl")
        )

    {out, status} =
      System.cmd(@chroot_script, ["erlc", release, "-o", ebin | sources], stderr_to_stdout: true)

    if status != 0, do: raise("erlc of OTP #{release} failed:\n" <> out)
    ebin
  end

  @doc """
  Starts a node of the deployment on OTP `release`; `opts` as for `start/2` (pass
  `ebin: release_ebin(release)` to compile once for many nodes).
  """
  def start_release(node, release, opts \\ [])
  def start_release(node, @host_release, opts), do: start(node, opts)

  def start_release(node, release, opts) do
    opts =
      opts
      |> Keyword.put_new(:exec, {@chroot_script, ["erl", release]})
      |> Keyword.put_new_lazy(:ebin, fn -> release_ebin(release) end)

    start(node, opts)
  end

  @doc "Polls `fun` every 50 ms until it returns a truthy value or `ms` pass."
  def eventually(fun, ms \\ 5_000) do
    deadline = System.monotonic_time(:millisecond) + ms
    do_eventually(fun, deadline)
  end

  defp do_eventually(fun, deadline) do
    case fun.() do
      result when result not in [nil, false] ->
        result

      _ ->
        if System.monotonic_time(:millisecond) > deadline do
          false
        else
          Process.sleep(50)
          do_eventually(fun, deadline)
        end
    end
  end
end
