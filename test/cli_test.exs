defmodule TrustDist.CliTest do
  @moduledoc "bin/trust-dist as tests, the demo and operators use it (DESIGN §4 forms)."
  use ExUnit.Case, async: true

  import Bitwise
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
end
