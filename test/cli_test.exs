defmodule TrustDist.CliTest do
  @moduledoc "bin/trust-dist as tests, the demo and operators use it (DESIGN §4 forms)."
  use ExUnit.Case, async: true

  import Bitwise
  import ExUnit.CaptureIO
  alias TrustDist.TestCluster, as: C

  @moduletag :tmp_dir

  defp cli(args), do: System.cmd(C.cli(), args, stderr_to_stdout: true)

  defp mode(path), do: File.stat!(path).mode &&& 0o777

  test "authority new writes a 0600 key and refuses to overwrite", %{tmp_dir: dir} do
    auth = Path.join(dir, "auth")
    assert {out, 0} = cli(["authority", "new", auth])
    assert out =~ "SHA256:"
    assert mode(Path.join(auth, "authority.key")) == 0o600
    assert File.read!(Path.join(auth, "authority.pub")) =~ "BEGIN PUBLIC KEY"
    key = File.read!(Path.join(auth, "authority.key"))
    assert {out, 2} = cli(["authority", "new", auth])
    assert out =~ "--force"
    assert File.read!(Path.join(auth, "authority.key")) == key
    assert {_, 0} = cli(["authority", "new", auth, "--force"])
    refute File.read!(Path.join(auth, "authority.key")) == key
  end

  test "node new, cert show and cert verify", %{tmp_dir: dir} do
    auth = Path.join(dir, "auth")
    {_, 0} = cli(["authority", "new", auth])
    out_dir = Path.join(dir, "nodes")

    assert {_, 0} =
             cli([
               "node",
               "new",
               "web-1@10.0.0.7",
               "--tier",
               "worker",
               "--authority",
               auth,
               "--out",
               out_dir
             ])

    cert = Path.join(out_dir, "web-1.cert")
    assert mode(Path.join(out_dir, "web-1.key")) == 0o600
    assert {shown, 0} = cli(["cert", "show", cert])
    assert shown =~ "node:        web-1@10.0.0.7"
    assert shown =~ "tier:        worker"
    assert shown =~ "key:         SHA256:"

    assert {_, 0} = cli(["cert", "verify", cert, "--authority", auth])
    other = Path.join(dir, "other")
    {_, 0} = cli(["authority", "new", other])
    assert {out, 1} = cli(["cert", "verify", cert, "--authority", other])
    assert out =~ "not among the configured authorities"

    now = System.os_time(:second)

    {_, 0} =
      cli([
        "node",
        "new",
        "old@h",
        "--tier",
        "worker",
        "--authority",
        auth,
        "--out",
        out_dir,
        "--not-before",
        "#{now - 100}",
        "--not-after",
        "#{now - 10}"
      ])

    assert {out, 1} = cli(["cert", "verify", Path.join(out_dir, "old.cert"), "--authority", auth])
    assert out =~ "expired"

    assert {out, 2} = cli(["cert", "show", Path.join(out_dir, "web-1.key")])
    assert out =~ "is this a key file?"

    assert {_, 2} =
             cli([
               "node",
               "new",
               "no-host",
               "--tier",
               "worker",
               "--authority",
               auth,
               "--out",
               out_dir
             ])

    assert {_, 2} =
             cli(["node", "new", "a@h", "--tier", "Bad", "--authority", auth, "--out", out_dir])
  end

  test "dev-cluster writes a complete deployment per node", %{tmp_dir: dir} do
    assert {_, 0} =
             cli([
               "dev-cluster",
               dir,
               "a@127.0.0.1:admin",
               "b@127.0.0.1:worker",
               "--ebin",
               C.ebin()
             ])

    for n <- ~w(a b) do
      node_dir = Path.join(dir, n)
      assert mode(Path.join(node_dir, "#{n}.key")) == 0o600

      assert {:ok, [[trust_dist: config]]} =
               :file.consult(String.to_charlist(Path.join(node_dir, "sys.config")))

      assert config[:tiers] == [:admin, :worker]
      args = File.read!(Path.join(node_dir, "vm.args"))
      assert args =~ "-name #{n}@127.0.0.1"
      assert args =~ "-proto_dist trust"
      assert args =~ "-config #{Path.join(node_dir, "sys.config")}"
    end

    assert {out, 2} = cli(["dev-cluster", dir, "a@127.0.0.1:admin", "--ebin", C.ebin()])
    assert out =~ "--force"
  end

  test "--help exits 0 and documents exit codes for every command" do
    for cmd <- [
          ~w(authority new),
          ~w(node new),
          ~w(node rotate),
          ~w(cert show),
          ~w(cert verify),
          ~w(revoke),
          ~w(check),
          ~w(policy explain),
          ~w(dev-cluster)
        ] do
      assert {out, 0} = cli(cmd ++ ["--help"])
      assert out =~ "Exit codes", inspect(cmd)
    end

    assert {_, 0} = cli(["--help"])
  end

  test "node rotate keeps name and tier, changes the key and keeps the old pair",
       %{tmp_dir: dir} do
    auth = Path.join(dir, "auth")
    out_dir = Path.join(dir, "nodes")
    {_, 0} = cli(["authority", "new", auth])
    node_args = ["--authority", auth, "--out", out_dir]
    {_, 0} = cli(["node", "new", "web@10.0.0.7", "--tier", "worker"] ++ node_args)
    {before, 0} = cli(["cert", "show", Path.join(out_dir, "web.cert")])
    old_key = File.read!(Path.join(out_dir, "web.key"))

    assert {out, 0} = cli(["node", "rotate", "web@10.0.0.7"] ++ node_args)
    assert out =~ "old key: SHA256:"
    assert out =~ "new key: SHA256:"
    {after_, 0} = cli(["cert", "show", Path.join(out_dir, "web.cert")])
    field = fn text, name -> Regex.run(~r/#{name}:\s+(\S+)/, text, capture: :all_but_first) end
    assert field.(after_, "node") == ["web@10.0.0.7"]
    assert field.(after_, "tier") == ["worker"]
    refute field.(after_, "key") == field.(before, "key")
    refute field.(after_, "serial") == field.(before, "serial")
    assert File.read!(Path.join(out_dir, "web.key.old")) == old_key
    assert mode(Path.join(out_dir, "web.key.old")) == 0o600
    assert mode(Path.join(out_dir, "web.key")) == 0o600
    assert {_, 0} = cli(["cert", "verify", Path.join(out_dir, "web.cert"), "--authority", auth])

    assert {out, 2} = cli(["node", "rotate", "web@10.0.0.7"] ++ node_args)
    assert out =~ "--force"
  end

  test "revoke appends lines, check catches a revoked or misconfigured node", %{tmp_dir: dir} do
    {_, 0} =
      cli(["dev-cluster", dir, "a@127.0.0.1:admin", "b@127.0.0.1:worker", "--ebin", C.ebin()])

    config = Path.join([dir, "b", "sys.config"])
    assert {out, 0} = cli(["check", config])
    refute out =~ "FAIL"

    list = Path.join(dir, "revoked.list")
    {shown, 0} = cli(["cert", "show", Path.join([dir, "b", "b.cert"])])
    [fingerprint] = Regex.run(~r/key:\s+(SHA256:\S+)/, shown, capture: :all_but_first)
    assert {_, 0} = cli(["revoke", list, "--key", fingerprint, "--comment", "rebuilt"])
    assert File.read!(list) == "key #{fingerprint}  # rebuilt\n"
    assert {_, 2} = cli(["revoke", list, "--key", "SHA256:nonsense"])
    assert {_, 2} = cli(["revoke", list, "--serial", "xyz", "1"])
    assert File.read!(list) == "key #{fingerprint}  # rebuilt\n"

    {:ok, [[trust_dist: env]]} = :file.consult(String.to_charlist(config))
    env = env ++ [revoked: String.to_charlist(list), bogus: 1, busy_poll_us: -1]
    File.write!(config, :io_lib.format(~c"~tp.~n", [[trust_dist: env]]))
    assert {out, 1} = cli(["check", config])
    assert out =~ ~r/^FAIL revoked: this node's own key #{Regex.escape(fingerprint)}/m
    assert out =~ ~r/^FAIL keys: unknown key bogus/m
    assert out =~ ~r/^FAIL busy_poll_us: must be an integer from 0 \(off\) to 1000 /m

    File.chmod!(Path.join([dir, "b", "b.key"]), 0o644)
    assert {out, 1} = cli(["check", config])
    assert out =~ "chmod 600"
    assert {_, 2} = cli(["check", Path.join(dir, "missing.config")])
  end

  test "policy explain for a restricted and a full tier", %{tmp_dir: dir} do
    {_, 0} =
      cli(["dev-cluster", dir, "a@127.0.0.1:admin", "b@127.0.0.1:worker", "--ebin", C.ebin()])

    config = Path.join([dir, "a", "sys.config"])
    {:ok, [[trust_dist: env]]} = :file.consult(String.to_charlist(config))

    policy = %{
      worker: %{registered: [:results], rpc: [{:my_app, :report, 1}], max_message_size: 4096}
    }

    env = env ++ [policy: policy, assertions: [{:worker, :may_not, :spawn}]]
    File.write!(config, :io_lib.format(~c"~tp.~n", [[trust_dist: env]]))
    assert {_, 0} = cli(["check", config])

    assert {out, 0} = cli(["policy", "explain", config, "--peer-tier", "worker"])
    assert out =~ "RESTRICTED"
    assert out =~ "results: send allowed, monitor allowed"
    assert out =~ "my_app:report/1: allowed"
    assert out =~ "4096 bytes allowed, 4097 bytes refused"
    assert out =~ "exit/2 to this node's processes: refused"

    assert {out, 0} = cli(["policy", "explain", config, "--peer-tier", "admin"])
    assert out =~ "FULL"
    assert {_, 2} = cli(["policy", "explain", config, "--peer-tier", "nobody"])
  end

  test "the mix tasks run the CLI with the same arguments and exit codes", %{tmp_dir: dir} do
    auth = Path.join(dir, "auth")

    out = capture_io(fn -> Mix.Tasks.TrustDist.Authority.New.run([auth]) end)
    assert out =~ "authority SHA256:"
    assert mode(Path.join(auth, "authority.key")) == 0o600

    capture_io(fn ->
      assert catch_exit(Mix.Tasks.TrustDist.Authority.New.run([auth])) == {:shutdown, 2}
    end)

    out_dir = Path.join(dir, "nodes")

    capture_io(fn ->
      Mix.Tasks.TrustDist.Node.New.run(~w(n@h --tier worker --authority #{auth} --out #{out_dir}))
    end)

    cert = Path.join(out_dir, "n.cert")

    assert capture_io(fn -> Mix.Tasks.TrustDist.Cert.Show.run([cert]) end) =~
             "tier:        worker"

    assert capture_io(fn -> Mix.Tasks.TrustDist.Check.run(["--help"]) end) =~ "Exit codes"
    assert capture_io(fn -> Mix.Tasks.TrustDist.run(["cert", "show", cert]) end) =~ "n@h"

    for task <- ~w(trust_dist trust_dist.authority.new trust_dist.node.new trust_dist.node.rotate
                   trust_dist.cert.show trust_dist.cert.verify trust_dist.revoke trust_dist.check
                   trust_dist.policy.explain trust_dist.dev_cluster) do
      assert Mix.Task.get(task), task
    end
  end
end
