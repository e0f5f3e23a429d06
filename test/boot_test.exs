defmodule TrustDist.BootTest do
  @moduledoc """
  How nodes come up on the carrier: from `sys.config` + `vm.args` with `erl -pa`, from
  a release boot script in embedded mode, without EPMD, over IPv6; and how a wrong
  configuration stops the boot with a message that names the key.
  """
  use ExUnit.Case, async: false

  alias TrustDist.TestCluster, as: C

  @moduletag :tmp_dir

  # Runs `erl` with `args` to completion; returns {output, exit status}. A boot that is
  # meant to fail says why on stderr; it leaves no crash dump in the working directory.
  defp erl(args, timeout \\ 30_000) do
    env = [{"ERL_CRASH_DUMP_SECONDS", "0"}]
    task = Task.async(fn -> System.cmd("erl", args, stderr_to_stdout: true, env: env) end)
    Task.await(task, timeout)
  end

  defp eval_and_halt(code), do: ["-noshell", "-eval", code <> ", halt()."]

  test "erl -args_file vm.args boots on the carrier from any directory", %{tmp_dir: dir} do
    {a, b} = {C.unique("a"), C.unique("b")}
    nodes = C.dev_cluster(Path.join(dir, "deploy"), [{a, :admin}, {b, :admin}])
    pb = C.start(nodes[b])
    on_exit(fn -> C.stop(pb) end)

    code = ~s|io:format("~p ~p~n", [net_adm:ping('#{nodes[b].node}'), node()])|

    {out, status} =
      System.cmd("erl", ["-args_file", Path.join(nodes[a].dir, "vm.args")] ++ eval_and_halt(code),
        cd: System.tmp_dir!(),
        stderr_to_stdout: true
      )

    assert status == 0, out
    assert out =~ "pong '#{nodes[a].node}'"
  end

  test "a release boot script in embedded mode brings the carrier up", %{tmp_dir: dir} do
    {a, b} = {C.unique("a"), C.unique("b")}
    nodes = C.dev_cluster(Path.join(dir, "deploy"), [{a, :admin}, {b, :admin}])
    pb = C.start(nodes[b])
    on_exit(fn -> C.stop(pb) end)

    rel = Path.join(dir, "trust_rel")

    versions =
      for app <- [:kernel, :stdlib, :crypto, :compiler, :elixir, :logger] do
        _ = Application.load(app)
        {app, Application.spec(app, :vsn)}
      end

    {:ok, vsn} = :application.get_key(:trust_dist, :vsn)

    rel_term =
      {:release, {~c"trust_rel", ~c"1"}, {:erts, :erlang.system_info(:version)},
       versions ++ [{:trust_dist, vsn}]}

    File.write!(rel <> ".rel", :io_lib.format(~c"~tp.~n", [rel_term]))
    path = [String.to_charlist(C.ebin()) | :code.get_path()]

    assert :ok ==
             :systools.make_script(String.to_charlist(rel), [:local, :silent, {:path, path}])
             |> elem(0)

    args =
      ["-boot", rel, "-mode", "embedded"] ++
        (nodes[a].args
         |> Enum.chunk_every(2)
         |> Enum.reject(&match?(["-pa", _], &1))
         |> Enum.concat())

    pa = C.start(%{nodes[a] | args: args})
    on_exit(fn -> C.stop(pa) end)
    assert C.call(pa, :init, :get_argument, [:mode]) == {:ok, [[~c"embedded"]]}
    assert C.call(pa, :net_adm, :ping, [nodes[b].node]) == :pong
    assert [%{mode: :full}] = C.call(pa, :trust_dist, :links, [])
  end

  test "-no_epmd with configured ports", %{tmp_dir: dir} do
    {a, b} = {C.unique("a"), C.unique("b")}
    nodes = C.dev_cluster(dir, [{a, :admin}, {b, :admin}])
    [port_a, port_b] = free_udp_ports(2)
    C.put_config(nodes[a].dir, listen: %{port: port_a}, ports: %{nodes[b].node => port_b})
    C.put_config(nodes[b].dir, listen: %{port: port_b}, ports: %{nodes[a].node => port_a})
    pa = C.start(nodes[a], args: ["-no_epmd"])
    pb = C.start(nodes[b], args: ["-no_epmd"])
    on_exit(fn -> Enum.each([pa, pb], &C.stop/1) end)

    assert C.call(pa, :net_adm, :ping, [nodes[b].node]) == :pong
    assert C.call(pb, :erpc, :call, [nodes[a].node, :erlang, :node, []]) == nodes[a].node
    # Nothing was registered with EPMD.
    {:ok, names} = :erl_epmd.names(~c"127.0.0.1")
    refute Enum.any?(names, fn {name, _} -> to_string(name) in [a, b] end)
  end

  test "a node whose transport thread does not busy-poll still links", %{tmp_dir: dir} do
    {a, b} = {C.unique("a"), C.unique("b")}
    nodes = C.dev_cluster(dir, [{a, :admin}, {b, :admin}])
    C.put_config(nodes[a].dir, busy_poll_us: 0)
    C.put_config(nodes[b].dir, busy_poll_us: 1000)
    pa = C.start(nodes[a])
    pb = C.start(nodes[b])
    on_exit(fn -> Enum.each([pa, pb], &C.stop/1) end)
    assert C.call(pa, :net_adm, :ping, [nodes[b].node]) == :pong
    assert C.call(pb, :erpc, :call, [nodes[a].node, :erlang, :node, []]) == nodes[a].node
  end

  test "IPv6 node names and addresses", %{tmp_dir: dir} do
    {a, b} = {C.unique("a"), C.unique("b")}
    nodes = C.dev_cluster(dir, [{a, :admin}, {b, :admin}], host: "::1")
    pa = C.start(nodes[a])
    pb = C.start(nodes[b])
    on_exit(fn -> Enum.each([pa, pb], &C.stop/1) end)
    assert C.call(pa, :net_adm, :ping, [nodes[b].node]) == :pong
    assert [%{address: {{0, 0, 0, 0, 0, 0, 0, 1}, _}}] = C.call(pa, :trust_dist, :links, [])
  end

  describe "a wrong configuration stops the boot and names the key" do
    setup %{tmp_dir: dir} do
      a = C.unique("a")
      nodes = C.dev_cluster(dir, [{a, :admin}])
      %{node: nodes[a], dir: dir}
    end

    defp boot(node) do
      erl(["-name", Atom.to_string(node.node)] ++ node.args ++ eval_and_halt("ok"))
    end

    defp assert_refused(node, key, text) do
      {out, status} = boot(node)
      assert status != 0, "boot succeeded:\n" <> out
      assert out =~ "trust_dist configuration key '#{key}'", out
      assert out =~ text, out
    end

    test "missing key", %{node: node} do
      path = Path.join(node.dir, "sys.config")
      {:ok, [[trust_dist: section]]} = :file.consult(String.to_charlist(path))

      File.write!(
        path,
        :io_lib.format(~c"~tp.~n", [[trust_dist: Keyword.delete(section, :identity)]])
      )

      assert_refused(node, :identity, "is missing")
    end

    test "unknown key", %{node: node} do
      C.put_config(node.dir, polcy: %{})
      assert_refused(node, :polcy, "unknown key")
    end

    test "a busy-poll time out of range", %{node: node} do
      C.put_config(node.dir, busy_poll_us: 2000)
      assert_refused(node, :busy_poll_us, "from 0 (off) to 1000 microseconds")
    end

    test "a private key others can read", %{node: node} do
      key = Path.wildcard(Path.join(node.dir, "*.key")) |> hd()
      File.chmod!(key, 0o644)
      assert_refused(node, :identity, "chmod 600")
    end

    test "a certificate that does not belong to the key", %{node: node, dir: dir} do
      other = C.dev_cluster(Path.join(dir, "other"), [{"zz", :admin}])

      File.cp!(
        Path.join(other["zz"].dir, "zz.cert"),
        Path.wildcard(Path.join(node.dir, "*.cert")) |> hd()
      )

      assert_refused(node, :certificate, "authorit")
    end

    test "an expired certificate", %{node: node, dir: dir} do
      [name, _] = node.node |> Atom.to_string() |> String.split("@")
      now = System.os_time(:second)

      {_, 0} =
        System.cmd(C.cli(), [
          "node",
          "new",
          Atom.to_string(node.node),
          "--tier",
          "admin",
          "--authority",
          Path.join(dir, "authority"),
          "--out",
          node.dir,
          "--force",
          "--not-before",
          "#{now - 7200}",
          "--not-after",
          "#{now - 3600}"
        ])

      assert Path.join(node.dir, "#{name}.cert") |> File.exists?()
      assert_refused(node, :certificate, "expired")
    end

    test "a tampered certificate", %{node: node} do
      cert = Path.wildcard(Path.join(node.dir, "*.cert")) |> hd()

      [begin_line, body, end_line] =
        File.read!(cert)
        |> String.split("\n", trim: true)
        |> then(fn [b | rest] -> [b, Enum.drop(rest, -1) |> Enum.join(), List.last(rest)] end)

      # Change one base64 character in the middle of the signed body.
      mid = div(byte_size(body), 3)
      <<pre::binary-size(mid), c, post::binary>> = body
      flipped = if c == ?A, do: ?B, else: ?A

      File.write!(
        cert,
        Enum.join([begin_line, pre <> <<flipped>> <> post, end_line], "\n") <> "\n"
      )

      {out, status} = boot(node)
      assert status != 0
      assert out =~ "trust_dist configuration key 'certificate'", out
    end

    test "a tier list without this node's tier", %{node: node} do
      C.put_config(node.dir, tiers: [:worker, :edge])
      assert_refused(node, :tiers, "not in the configured tiers")
    end

    test "a bad listen port", %{node: node} do
      C.put_config(node.dir, listen: %{port: 70000})
      assert_refused(node, :listen, "not a UDP port number")
    end

    test "a bad static port map", %{node: node} do
      C.put_config(node.dir, ports: %{"b@h" => 4370})
      assert_refused(node, :ports, "must map a node name atom to a UDP port")
    end

    test "a policy for a tier that does not exist", %{node: node} do
      C.put_config(node.dir, policy: %{wroker: %{}})
      assert_refused(node, :policy, "names tier wroker")
    end

    test "an unknown policy option", %{node: node} do
      C.put_config(node.dir, tiers: [:admin, :worker], policy: %{worker: %{registred: [:results]}})

      assert_refused(node, :policy, "unknown option registred")
    end

    test "a policy value of the wrong type", %{node: node} do
      C.put_config(node.dir, tiers: [:admin, :worker], policy: %{worker: %{max_message_size: -1}})
      assert_refused(node, :policy, "max_message_size must be a positive integer")
    end

    test "a policy exposing an OTP system process", %{node: node} do
      C.put_config(node.dir, tiers: [:admin, :worker], policy: %{worker: %{registered: [:rex]}})
      assert_refused(node, :policy, "rex is an OTP system process")
    end

    test "a malformed assertion", %{node: node} do
      C.put_config(node.dir, tiers: [:admin, :worker], assertions: [{:worker, :might, :spawn}])
      assert_refused(node, :assertions, "is not an assertion")
    end

    test "an assertion that does not hold", %{node: node} do
      C.put_config(node.dir, tiers: [:admin, :worker], assertions: [{:worker, :may, :spawn}])
      assert_refused(node, :assertions, "{worker, may, spawn} does not hold")
    end

    test "a revocation list that is missing", %{node: node} do
      C.put_config(node.dir, revoked: ~c"/nonexistent/revoked.list")
      assert_refused(node, :revoked, "cannot read /nonexistent/revoked.list")
    end

    test "a revocation list that revokes this node", %{node: node} do
      cert = Path.wildcard(Path.join(node.dir, "*.cert")) |> hd()
      {show, 0} = System.cmd(C.cli(), ["cert", "show", cert])
      [_, fingerprint] = Regex.run(~r/(SHA256:\S+)/, show)
      path = Path.join(node.dir, "revoked.list")
      File.write!(path, "key #{fingerprint}\n")
      C.put_config(node.dir, revoked: String.to_charlist(path))
      assert_refused(node, :revoked, "this node's own certificate is revoked")
    end

    test "a revocation list that does not parse", %{node: node} do
      path = Path.join(node.dir, "revoked.list")
      File.write!(path, "# fine\nrevoke everyone\n")
      C.put_config(node.dir, revoked: String.to_charlist(path))
      assert_refused(node, :revoked, "line 2")
    end
  end

  defp free_udp_ports(n) do
    sockets = for _ <- 1..n, do: elem(:gen_udp.open(0, [:inet]), 1)
    ports = for s <- sockets, do: elem(:inet.port(s), 1)
    Enum.each(sockets, &:gen_udp.close/1)
    ports
  end
end
