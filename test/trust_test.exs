defmodule TrustDist.TrustTest do
  @moduledoc """
  Directional trust between three tiers, admin > worker > edge, each its own VM on
  loopback, on this machine's OTP and again with every node on OTP 29 (the sid chroot;
  skipped with the reason when it has not been built).

  Downward (admin -> worker, admin -> edge, worker -> edge) is plain distribution. Upward
  (worker -> admin, edge -> admin, edge -> worker) a lower node may answer what it was
  asked and reach only what the higher node's policy lists; every attack below is checked
  by its effect on the higher node (a marker file that attacker-supplied code would write,
  a pid that must not change, a state that must equal the one recorded before), not only
  by counters. After each attack, admin must be the same VM and still serve its link to
  edge.

  The nodes of one release are started once (setup_all) and shared by the tests; before
  each test the fixtures are checked and, where an earlier attack succeeded (on a carrier
  that does not filter), repaired, so one successful attack does not fail the tests after
  it.
  """
  use ExUnit.Case, async: false

  alias TrustDist.TestCluster, as: C

  @moduletag timeout: 60_000

  @tiers [:admin, :worker, :edge]
  @host_release C.host_release()
  @releases Enum.uniq([@host_release, "29"])

  # role => tier. admin, worker and edge are the three tiers under test; admin2 is a
  # second admin-tier node, lone a worker that no one dials, auditor an admin-tier node
  # whose policy for workers is audit-only and lets them dial it.
  @roles [
    admin: :admin,
    worker: :worker,
    edge: :edge,
    admin2: :admin,
    lone: :worker,
    auditor: :admin
  ]

  @admin_policy %{
    worker: %{
      registered: [:results],
      rpc: [{:trust_dist_probe, :allowed_fun, 1}],
      max_message_size: 65_536,
      funs: false,
      connect: false,
      audit: false
    },
    edge: %{registered: [:results]}
  }

  @admin_assertions [
    {:worker, :may_not, :spawn},
    {:worker, :may, {:send, :results}},
    {:worker, :may, {:monitor, :results}},
    {:worker, :may, {:call, :trust_dist_probe, :allowed_fun, 1}},
    {:worker, :may_not, {:call, :trust_dist_probe, :forbidden_fun, 1}},
    {:worker, :may_not, :connect},
    {:worker, :may_not, :exit},
    {:worker, :may_not, :link},
    {:worker, :may_not, :group_leader},
    {:worker, :may_not, :funs},
    {:worker, :may_not, {:message_size, 100_000}},
    {:edge, :may_not, :spawn},
    {:edge, :may, {:send, :results}}
  ]

  defp config_for(:admin), do: [policy: @admin_policy, assertions: @admin_assertions]
  defp config_for(:admin2), do: [policy: @admin_policy, assertions: @admin_assertions]

  defp config_for(:auditor),
    do: [
      policy: %{worker: %{registered: [:results], audit: true, connect: true}},
      assertions: [{:worker, :may, :connect}]
    ]

  defp config_for(role) when role in [:worker, :lone],
    do: [policy: %{edge: %{registered: [:results]}}]

  defp config_for(:edge), do: []

  # ---------------------------------------------------------------------------------------
  # The deployment

  setup_all do
    {:ok, registry} = Agent.start(fn -> %{} end)
    base = Path.join(C.root(), "tmp/trust_test/#{System.os_time(:millisecond)}-#{System.pid()}")

    on_exit(fn ->
      for {_release, cl} <- Agent.get(registry, & &1), {_role, peer} <- cl.peers do
        C.stop(peer)
      end

      for {_release, cl} <- Agent.get(registry, & &1), {role, os_pid} <- cl.os_pids do
        kill_os_pid(os_pid, cl.nodes[role].node)
      end

      Agent.stop(registry)
      File.rm_rf(base)
    end)

    @releases
    |> Enum.filter(&C.release_available?/1)
    |> Enum.map(fn release ->
      Task.async(fn -> {release, boot(release, Path.join(base, "otp#{release}"))} end)
    end)
    |> Task.await_many(120_000)
    |> Enum.each(fn {release, cl} -> Agent.update(registry, &Map.put(&1, release, cl)) end)

    %{registry: registry}
  end

  defp boot(release, dir) do
    names = Map.new(@roles, fn {role, _} -> {role, C.unique(to_string(role))} end)

    nodes =
      C.dev_cluster(dir, Enum.map(@roles, fn {role, tier} -> {names[role], tier} end),
        tiers: @tiers
      )

    nodes = Map.new(@roles, fn {role, _} -> {role, nodes[names[role]]} end)

    for {role, _} <- @roles, config_for(role) != [] do
      C.put_config(nodes[role].dir, config_for(role))
    end

    ebin = C.release_ebin(release)

    peers =
      @roles
      |> Enum.map(fn {role, _} ->
        Task.async(fn -> {role, start_node(nodes[role], role, release, ebin)} end)
      end)
      |> Task.await_many(60_000)
      |> Map.new()

    cl = %{release: release, dir: dir, ebin: ebin, nodes: nodes, peers: peers, os_pids: %{}}
    os_pids = Map.new(peers, fn {role, peer} -> {role, C.os_pid(peer)} end)
    %{cl | os_pids: os_pids}
  end

  defp start_node(node, role, release, ebin) do
    C.start_release(node, release, link: false, ebin: ebin)
  catch
    :exit, why ->
      raise "#{role} (OTP #{release}) did not boot: #{inspect(why)}. Its output is above"
  end

  # Kills a node's VM we started, and only if that OS process is still that node.
  defp kill_os_pid(os_pid, node) do
    case File.read("/proc/#{os_pid}/cmdline") do
      {:ok, cmdline} ->
        [name, _] = node |> Atom.to_string() |> String.split("@")
        if cmdline =~ name, do: System.cmd("kill", ["-9", "#{os_pid}"], stderr_to_stdout: true)

      _ ->
        :ok
    end
  end

  # Before each test: every node up (restarted if an attack brought it down), the fixtures
  # in place, admin linked to worker, edge and admin2, worker to edge. Returns the cluster
  # and what admin looked like before the test.
  setup %{registry: registry} = ctx do
    case ctx[:release] do
      nil ->
        :ok

      release ->
        case Agent.get(registry, & &1[release]) do
          nil ->
            flunk("the OTP #{release} nodes did not start")

          cl ->
            cl = Enum.reduce(@roles, cl, fn {role, _}, cl -> ensure_up(cl, role) end)
            Agent.update(registry, &Map.put(&1, release, cl))

            for role <- [:admin, :admin2, :auditor] do
              :ok = on(cl, role, :trust_fixtures, [])
            end

            for {from, to} <- [admin: :worker, admin: :edge, worker: :edge, admin: :admin2] do
              assert erl(cl, from, :net_adm, :ping, [node_of(cl, to)]) == :pong,
                     "#{from} cannot reach #{to} before the test"
            end

            %{cl: cl, before: admin_snapshot(cl)}
        end
    end
  end

  defp ensure_up(cl, role) do
    # Up means running normally: a node whose init was told to stop is replaced.
    alive =
      try do
        C.call(cl.peers[role], :init, :get_status, [], 3_000) == {:started, :started}
      catch
        _, _ -> false
      end

    if alive do
      cl
    else
      C.stop(cl.peers[role])
      kill_os_pid(cl.os_pids[role], cl.nodes[role].node)
      wait_epmd_free(cl.nodes[role].node)
      peer = start_node(cl.nodes[role], role, cl.release, cl.ebin)

      %{
        cl
        | peers: Map.put(cl.peers, role, peer),
          os_pids: Map.put(cl.os_pids, role, C.os_pid(peer))
      }
    end
  end

  defp wait_epmd_free(node) do
    [name, _] = node |> Atom.to_string() |> String.split("@")

    C.eventually(fn ->
      {:ok, names} = :erl_epmd.names(~c"127.0.0.1")
      not Enum.any?(names, fn {n, _} -> to_string(n) == name end)
    end)
  end

  defp admin_snapshot(cl) do
    %{
      os_pid: cl.os_pids[:admin],
      edge_connection: on(cl, :admin, :connection_id, [node_of(cl, :edge)])
    }
  end

  # ---------------------------------------------------------------------------------------
  # Helpers

  defp on(cl, role, fun, args, timeout \\ 15_000),
    do: C.call(cl.peers[role], :trust_dist_probe, fun, args, timeout)

  defp erl(cl, role, m, f, args, timeout \\ 15_000),
    do: C.call(cl.peers[role], m, f, args, timeout)

  defp node_of(cl, role), do: cl.nodes[role].node

  defp results(cl, role \\ :admin), do: {:results, node_of(cl, role)}

  defp tag, do: System.unique_integer([:positive])

  defp marker(cl, what), do: Path.join(cl.dir, "marker-#{what}-#{tag()}")

  defp registered(cl, role, names), do: on(cl, role, :whereis_all, [names])

  # Sends {sync, Tag} from `from` to `to`'s results and waits until it is recorded: every
  # signal `from` sent to `to` before it has then been through `to`'s input.
  defp sync(cl, from, to) do
    t = tag()

    try do
      :ok = on(cl, from, :send_to, [results(cl, to), {:sync, t}])
      on(cl, to, :results_await, [{:info, {:sync, t}}, 3_000])
    catch
      :exit, why -> {:unreachable, why}
    end
  end

  defp assert_synced(cl, from \\ :worker, to \\ :admin) do
    result = sync(cl, from, to)

    assert result == true,
           "a message from #{from} to the allowlisted `results` on #{to} did not arrive: " <>
             inspect(result)
  end

  # After an attack: admin is the same VM, init is running, and its link to edge is the
  # same connection and works.
  defp assert_admin_intact(cl, before) do
    alive =
      try do
        C.call(cl.peers[:admin], :init, :get_status, [], 3_000)
      catch
        kind, why -> {:unreachable, kind, why}
      end

    assert alive == {:started, :started}, "admin is not running normally: #{inspect(alive)}"
    assert C.os_pid(cl.peers[:admin]) == before.os_pid, "admin is another VM"
    edge = node_of(cl, :edge)

    assert on(cl, :admin, :connection_id, [edge]) == before.edge_connection,
           "admin's connection to edge was dropped or replaced"

    assert erl(cl, :admin, :erpc, :call, [edge, :erlang, :node, [], 3_000]) == edge
  end

  defp refute_file(path, what) do
    refute File.exists?(path),
           "attack succeeded: #{what} ran (marker #{Path.basename(path)} written by " <>
             "#{inspect(File.read(path))})"
  end

  defp link_to(cl, from, to) do
    node = node_of(cl, to)
    Enum.find(erl(cl, from, :trust_dist, :links, []), &(&1.node == node))
  end

  defp count(link, op, verdict), do: get_in(link, [:counters, op, verdict]) || 0

  # ---------------------------------------------------------------------------------------
  # The tests, once per release

  for release <- @releases do
    describe "OTP #{release}" do
      @describetag release: release
      if release != @host_release, do: @describetag(:matrix)

      unless C.release_available?(release) do
        @describetag skip:
                       "OTP #{release} chroot not built (scripts/otp-chroot.sh ensure #{release})"
      end

      # ---- downward: plain distribution --------------------------------------------------

      for {from, to} <- [admin: :worker, admin: :edge, worker: :edge] do
        @tag pair: {from, to}
        test "downward #{from} -> #{to}: erpc, spawn_link, GenServer.call, monitors, links, exits, io",
             %{cl: cl, pair: {from, to}} do
          dest = node_of(cl, to)
          assert erl(cl, from, :erpc, :call, [dest, :erlang, :node, [], 3_000]) == dest
          assert on(cl, from, :spawn_link_remote, [dest]) == {dest, :done_remote}

          name = :"probe_server_#{from}"

          if erl(cl, to, :erlang, :whereis, [name]) == :undefined,
            do: on(cl, to, :start_server, [name])

          assert on(cl, from, :server_call, [name, dest, :hello]) == {:pong, dest, :hello}
          assert on(cl, from, :monitor_down, [dest, :mon_reason]) == {:down, :mon_reason}
          assert on(cl, from, :monitor_noproc, [dest]) == {:down, :noproc}
          assert on(cl, from, :link_exit, [dest, :link_reason]) == {:exit, :link_reason}
          assert on(cl, from, :remote_kill, [dest]) == {:down, :killed}
          echo = on(cl, to, :start_echo, [:"echo_#{tag()}"])
          assert on(cl, from, :echo_roundtrip, [echo, :to_pid, 3_000]) == :ok
          assert on(cl, from, :alias_roundtrip, [dest]) == :ok
          text = "io from #{to} to #{from}'s group leader #{tag()}\n"
          assert on(cl, from, :remote_io, [dest, text]) == text

          assert on(cl, from, :remote_io_format, [dest, ~c"~s ~b~n", [~c"formatted", 42]]) ==
                   "formatted 42\n"
        end
      end

      # ---- upward that must keep working -------------------------------------------------

      test "upward allowed: replies, erpc results, DOWN and EXIT for what admin asked", %{cl: cl} do
        w = node_of(cl, :worker)

        if erl(cl, :worker, :erlang, :whereis, [:probe_server]) == :undefined,
          do: on(cl, :worker, :start_server, [:probe_server])

        # gen_server:call replies come back to an alias admin handed over.
        assert on(cl, :admin, :server_call, [:probe_server, w, :hi]) == {:pong, w, :hi}
        assert erl(cl, :admin, :erpc, :call, [w, :erlang, :node, [], 3_000]) == w
        assert on(cl, :admin, :monitor_down, [w, :r1]) == {:down, :r1}
        assert on(cl, :admin, :link_exit, [w, :r2]) == {:exit, :r2}
        # Messages to a pid admin sent to worker (in a message, not an erpc argument).
        echo = on(cl, :worker, :start_echo, [:"echo_#{tag()}"])
        assert on(cl, :admin, :echo_roundtrip, [echo, :up_to_pid, 3_000]) == :ok
        assert on(cl, :admin, :alias_roundtrip, [w]) == :ok
      end

      test "upward allowed: messages, monitors and GenServer.call to the allowlisted name",
           %{cl: cl, before: before} do
        a = node_of(cl, :admin)
        t = tag()
        :ok = on(cl, :worker, :send_to, [results(cl), {:hello, t}])
        assert on(cl, :worker, :server_call, [:results, a, {:record, t}]) == {:recorded, a, t}
        assert on(cl, :admin, :results_await, [{:info, {:hello, t}}, 3_000]) == true
        assert {:call, t} in on(cl, :admin, :results_seen, [])
        assert on(cl, :worker, :monitor_alive, [results(cl), 300]) == :alive
        assert on(cl, :worker, :send_to, [results(cl), {:small, t, :binary.copy("x", 1024)}])

        assert on(cl, :admin, :results_await, [
                 {:info, {:small, t, :binary.copy("x", 1024)}},
                 3_000
               ])

        assert_admin_intact(cl, before)
      end

      test "upward allowed: the allowlisted erpc MFA runs; another function of that module does not",
           %{cl: cl, before: before} do
        a = node_of(cl, :admin)
        t = tag()

        assert {{:ok, {:allowed, ^a, ^t}}, _} =
                 on(cl, :worker, :try_erpc, [a, :trust_dist_probe, :allowed_fun, [t]])

        path = marker(cl, "forbidden_fun")
        result = on(cl, :worker, :try_erpc, [a, :trust_dist_probe, :forbidden_fun, [path]])
        refute_file(path, "trust_dist_probe:forbidden_fun/1 called by worker through erpc")
        assert {{:error, {:erpc, :notsup}}, ms} = result
        assert ms < 1_000
        assert_admin_intact(cl, before)
      end

      test "upward allowed: net_adm.ping from worker over the existing link", %{cl: cl} do
        assert erl(cl, :worker, :net_adm, :ping, [node_of(cl, :admin)]) == :pong
        assert erl(cl, :edge, :net_adm, :ping, [node_of(cl, :admin)]) == :pong
      end

      # ---- upward refused, effect verified on admin --------------------------------------

      test "upward refused: Node.spawn from worker dies at once with notsup, nothing runs",
           %{cl: cl, before: before} do
        path = marker(cl, "spawn")
        result = on(cl, :worker, :try_spawn, [node_of(cl, :admin), path])
        refute_file(path, "a process worker spawned")
        assert {:down, :notsup, ms} = result
        assert ms < 1_000
        assert_admin_intact(cl, before)
      end

      test "upward refused: :erpc.call and :rpc.call from worker fail fast, nothing runs",
           %{cl: cl, before: before} do
        a = node_of(cl, :admin)
        [p1, p2] = [marker(cl, "erpc"), marker(cl, "rpc")]
        erpc = on(cl, :worker, :try_erpc, [a, :trust_dist_probe, :touch, [p1]])
        rpc = on(cl, :worker, :try_rpc, [a, :trust_dist_probe, :touch, [p2]])
        refute_file(p1, "erpc from worker")
        refute_file(p2, "rpc from worker")
        assert {{:error, {:erpc, :notsup}}, ms} = erpc
        assert ms < 1_000
        assert {{:ok, {:badrpc, _}}, ms} = rpc
        assert ms < 1_000

        assert {{:error, {:erpc, :notsup}}, _} =
                 on(cl, :worker, :try_erpc, [a, :erlang, :node, []])

        assert_admin_intact(cl, before)
      end

      test "upward refused: exit(pid, :kill) on a guessed admin pid", %{cl: cl, before: before} do
        %{victim: victim} = registered(cl, :admin, [:victim])
        :ok = on(cl, :worker, :send_exit, [victim, :kill])
        assert_synced(cl)
        assert registered(cl, :admin, [:victim]) == %{victim: victim}, "victim was killed"
        assert erl(cl, :admin, :erlang, :is_process_alive, [victim])
        assert_admin_intact(cl, before)
      end

      test "upward refused: link to an admin process, then exit", %{cl: cl, before: before} do
        %{victim: victim} = registered(cl, :admin, [:victim])
        on(cl, :worker, :link_then_exit, [victim])
        assert_synced(cl)
        assert registered(cl, :admin, [:victim]) == %{victim: victim}, "victim died with the link"
        w = node_of(cl, :worker)
        assert Enum.filter(on(cl, :admin, :links_of, [:victim]), &(node(&1) == w)) == []
        assert_admin_intact(cl, before)
      end

      test "upward refused: {:stop, :stop} to init, by name and by its guessed pid",
           %{cl: cl, before: before} do
        %{init: init} = registered(cl, :admin, [:init])
        :ok = on(cl, :worker, :init_stop, [node_of(cl, :admin), init])
        Process.sleep(500)
        assert_admin_intact(cl, before)
        assert_synced(cl)
      end

      test "upward refused: a message to a guessed pid", %{cl: cl, before: before} do
        %{victim: victim} = registered(cl, :admin, [:victim])
        t = tag()
        :ok = on(cl, :worker, :send_to, [victim, {:guessed, t}])
        :ok = on(cl, :worker, :send_to, [{:victim, node_of(cl, :admin)}, {:by_name, t}])
        assert_synced(cl)
        seen = on(cl, :admin, :victim_seen, [])
        refute {:guessed, t} in seen, "worker's message reached a pid it guessed"
        refute {:by_name, t} in seen, "worker's message reached a name not in the policy"
        assert_admin_intact(cl, before)
      end

      test "upward refused: :sys.replace_state through the allowlisted name",
           %{cl: cl, before: before} do
        state = on(cl, :admin, :results_state, [])
        assert {:results, _} = state
        on(cl, :worker, :try_replace_state, [results(cl)])
        t = tag()
        :ok = on(cl, :worker, :send_to, [results(cl), {:sync, t}])
        on(cl, :admin, :results_await, [{:info, {:sync, t}}, 3_000])
        {:results, seen} = state

        assert on(cl, :admin, :results_state, []) == {:results, seen ++ [{:info, {:sync, t}}]},
               "results' state was replaced (or it no longer answers)"

        assert_admin_intact(cl, before)
      end

      test "upward refused: :sys.suspend through the allowlisted name", %{cl: cl, before: before} do
        %{results: pid} = registered(cl, :admin, [:results])
        # try_suspend returns once results acknowledged or after 1 s without an answer.
        on(cl, :worker, :try_suspend, [results(cl)])
        # A suspended gen_server answers no call, and its status says so.
        {:status, ^pid, _, [_, sys_state | _]} =
          erl(cl, :admin, :sys, :get_status, [:results, 1_000])

        assert sys_state == :running, "results is #{sys_state}"

        assert_synced(cl)

        assert_admin_intact(cl, before)
      end

      test "upward refused: a forged {:EXIT, parent, :shutdown} to the trapping allowlisted process",
           %{cl: cl, before: before} do
        fixtures = registered(cl, :admin, [:results, :results_parent])
        :ok = on(cl, :worker, :forged_exit, [results(cl), fixtures.results_parent])
        t = tag()
        :ok = on(cl, :worker, :send_to, [results(cl), {:sync, t}])
        synced = on(cl, :admin, :results_await, [{:info, {:sync, t}}, 3_000])

        assert registered(cl, :admin, [:results, :results_parent]) == fixtures,
               "results (or its parent) is gone: the forged EXIT was taken for the parent's"

        assert synced == true

        refute {:info, {:EXIT, fixtures.results_parent, :shutdown}} in on(
                 cl,
                 :admin,
                 :results_seen,
                 []
               )

        assert_admin_intact(cl, before)
      end

      test "upward refused: changing an admin process's group leader", %{cl: cl, before: before} do
        gl = on(cl, :admin, :group_leader_of, [:victim])
        %{victim: victim} = registered(cl, :admin, [:victim])
        on(cl, :worker, :set_group_leader, [victim])
        assert_synced(cl)
        assert on(cl, :admin, :group_leader_of, [:victim]) == gl, "victim's group leader changed"
        assert_admin_intact(cl, before)
      end

      test "upward refused: rex runs nothing (legacy rpc cast and call)", %{
        cl: cl,
        before: before
      } do
        [p1, p2] = [marker(cl, "rex-cast"), marker(cl, "rex-call")]
        on(cl, :worker, :rex_attack, [node_of(cl, :admin), p1, p2])
        assert_synced(cl)
        refute_file(p1, "a rex cast from worker")
        refute_file(p2, "a rex call from worker")
        assert_admin_intact(cl, before)
      end

      test "upward refused: net_kernel drops no connection for worker; ping still works",
           %{cl: cl, before: before} do
        on(cl, :worker, :net_kernel_attack, [node_of(cl, :admin), node_of(cl, :edge)])
        assert_synced(cl)
        assert_admin_intact(cl, before)
        assert erl(cl, :worker, :net_adm, :ping, [node_of(cl, :admin)]) == :pong
      end

      test "upward refused: code_server neither adds a path nor loads a module",
           %{cl: cl, before: before} do
        dir = Path.join(cl.dir, "evil-path-#{tag()}")
        File.mkdir_p!(dir)
        mod = :"trust_dist_evil_#{tag()}"
        # The module name exists on admin already, so only the code_server rule can stop it.
        erl(cl, :admin, :erlang, :binary_to_atom, [Atom.to_string(mod)])

        :ok =
          on(cl, :worker, :code_server_attack, [node_of(cl, :admin), String.to_charlist(dir), mod])

        assert_synced(cl)
        Process.sleep(100)

        refute on(cl, :admin, :in_code_path, [String.to_charlist(dir)]),
               "worker changed the code path"

        assert erl(cl, :admin, :code, :is_loaded, [mod]) == false, "worker loaded a module"
        assert_admin_intact(cl, before)
      end

      test "upward refused: application_controller stops no application", %{
        cl: cl,
        before: before
      } do
        assert on(cl, :admin, :app_running, [:runtime_tools])
        on(cl, :worker, :appctl_attack, [node_of(cl, :admin), :runtime_tools])
        assert_synced(cl)
        assert on(cl, :admin, :app_running, [:runtime_tools]), "worker stopped runtime_tools"
        assert_admin_intact(cl, before)
      end

      test "upward refused: global_name_server runs no fun", %{cl: cl, before: before} do
        path = marker(cl, "global")
        on(cl, :worker, :global_attack, [node_of(cl, :admin), path])
        assert_synced(cl)
        refute_file(path, "a registrar fun from worker")
        assert %{global_name_server: pid} = registered(cl, :admin, [:global_name_server])
        assert is_pid(pid)
        assert_admin_intact(cl, before)
      end

      test "upward refused: a spoofed sender pid (hand-written packet on worker's link)",
           %{cl: cl, before: before} do
        a = node_of(cl, :admin)
        t = tag()
        # A pid of edge, which worker merely claims to be.
        edge_pid = on(cl, :edge, :park, [])
        worker_pid = on(cl, :worker, :park, [])
        # The same packet with worker's own pid is delivered: the injection path works.
        :ok = on(cl, :worker, :inject_reg_send, [a, worker_pid, :results, {:genuine, t}])
        :ok = on(cl, :worker, :inject_reg_send, [a, edge_pid, :results, {:spoofed, t}])
        assert_synced(cl)
        seen = on(cl, :admin, :results_seen, [])
        refute {:info, {:spoofed, t}} in seen, "a message with a spoofed sender was delivered"
        assert {:info, {:genuine, t}} in seen
        assert_admin_intact(cl, before)
      end

      test "upward refused: 100,000 fresh atoms to the allowlisted name create none on admin",
           %{cl: cl, before: before} do
        t = tag()
        atoms_before = erl(cl, :admin, :erlang, :system_info, [:atom_count])
        :ok = on(cl, :worker, :atom_flood, [results(cl), t, 100_000, 1_000], 60_000)
        assert on(cl, :admin, :results_await, [{:info, {:atoms_done, t}}, 10_000]) == true
        grown = erl(cl, :admin, :erlang, :system_info, [:atom_count]) - atoms_before
        assert grown < 1_000, "admin's atom table grew by #{grown}"

        for i <- [0, 50_000, 99_999] do
          refute on(cl, :admin, :atom_exists, [~c"trust_dist_fresh_#{t}_#{i}"])
        end

        refute Enum.any?(on(cl, :admin, :results_seen, []), &match?({:info, {:atoms, ^t, _}}, &1))
        assert_admin_intact(cl, before)
      end

      test "upward refused: a message over max_message_size is not delivered",
           %{cl: cl, before: before} do
        t = tag()
        :ok = on(cl, :worker, :big_message, [results(cl), t, 100_000])
        assert on(cl, :admin, :results_await, [{:info, {:big_done, t}}, 5_000]) == true
        seen = on(cl, :admin, :results_seen, [])
        refute {:info, {:big, t, 100_000}} in seen, "a 100 kB message to results was delivered"
        assert_admin_intact(cl, before)
      end

      test "upward refused: a monitor flood is answered noproc and holds nothing on admin",
           %{cl: cl, before: before} do
        %{victim: victim} = registered(cl, :admin, [:victim])
        reports_before = length(on(cl, :admin, :reports, [:trust_dist_denied]))
        n = 20_000
        {holder, downs, ms} = on(cl, :worker, :monitor_flood, [victim, n, 3_000], 20_000)

        try do
          held = on(cl, :admin, :monitors_from, [:victim, node_of(cl, :worker)])
          assert held == 0, "worker holds #{held} monitors on an admin process"
          assert downs == %{noproc: n}, "DOWNs on worker: #{inspect(downs)}"
          assert ms < 3_000
          logged = length(on(cl, :admin, :reports, [:trust_dist_denied])) - reports_before
          assert logged <= 100, "#{n} denials made #{logged} log reports: not rate limited"
          assert_admin_intact(cl, before)
        after
          on(cl, :worker, :release, [holder])
        end
      end

      test "upward refused: a forged reply through the alias of admin's call to edge",
           %{cl: cl, before: before} do
        e = node_of(cl, :edge)
        name = :"slow_#{tag()}"
        :ok = on(cl, :edge, :start_slow, [name, 1_000])

        call =
          Task.async(fn ->
            erl(cl, :admin, :gen_server, :call, [{name, e}, :question, 3_000], 5_000)
          end)

        # Worker learns the caller's alias out of band: the point is that it guessed it.
        from =
          C.eventually(
            fn ->
              case on(cl, :edge, :slow_last_from, [name]) do
                {_pid, _tag} = from -> from
                _ -> nil
              end
            end,
            900
          )

        assert from, "edge did not see admin's call"
        :ok = on(cl, :worker, :forge_reply, [from, :forged])

        assert Task.await(call, 6_000) == {:genuine, :question},
               "admin's gen_server call returned worker's forged reply"

        assert_admin_intact(cl, before)
      end

      test "upward refused from edge, to admin and to worker", %{cl: cl, before: before} do
        for target <- [:admin, :worker] do
          path = marker(cl, "edge-erpc-#{target}")

          result =
            on(cl, :edge, :try_erpc, [node_of(cl, target), :trust_dist_probe, :touch, [path]])

          refute_file(path, "erpc from edge to #{target}")
          assert {{:error, {:erpc, :notsup}}, _} = result
        end

        t = tag()
        # Only atoms admin already knows may come from below: `hello` is one.
        :ok = on(cl, :edge, :send_to, [results(cl), {:hello, t}])
        assert on(cl, :admin, :results_await, [{:info, {:hello, t}}, 3_000]) == true
        assert_admin_intact(cl, before)
      end

      test "denials are counted per operation and logged", %{cl: cl} do
        path = marker(cl, "counted")
        on(cl, :worker, :try_spawn, [node_of(cl, :admin), path])
        link = link_to(cl, :admin, :worker)
        assert is_map(link[:counters]), "links() has no counters: #{inspect(link)}"
        assert count(link, :spawn_request, :answered) + count(link, :spawn_request, :dropped) >= 1
        assert is_integer(link[:denied]) and link[:denied] >= 1
        w = node_of(cl, :worker)

        # Reports are rate-limited per link (10 a second, the rest counted): right after
        # another test's flood (a monitor flood runs on this link) the first attempt's
        # report may be one of those counted, so each try makes a fresh denial.
        report =
          C.eventually(
            fn ->
              on(cl, :worker, :try_spawn, [node_of(cl, :admin), path])

              on(cl, :admin, :reports, [:trust_dist_denied])
              |> Enum.find(&(&1[:peer] == w and &1[:op] == :spawn_request))
            end,
            5_000
          )

        assert report, "no trust_dist_denied report for worker's spawn request"
        assert to_string(report[:tier]) == "worker"
        assert Map.has_key?(report, :reason)
      end

      # ---- topology ----------------------------------------------------------------------

      test "links across tiers are hidden; same-tier links are not", %{cl: cl} do
        [a, w, e, a2] = Enum.map([:admin, :worker, :edge, :admin2], &node_of(cl, &1))
        visible = fn role -> erl(cl, role, :erlang, :nodes, []) end
        hidden = fn role -> erl(cl, role, :erlang, :nodes, [:hidden]) end
        assert a2 in visible.(:admin)
        assert w not in visible.(:admin) and e not in visible.(:admin)
        assert w in hidden.(:admin) and e in hidden.(:admin)
        assert a not in visible.(:worker) and e not in visible.(:worker)
        assert a in hidden.(:worker) and e in hidden.(:worker)
        assert a not in visible.(:edge) and w not in visible.(:edge)

        assert w not in (visible.(:admin2) ++ hidden.(:admin2)) and
                 e not in (visible.(:admin2) ++ hidden.(:admin2)),
               "admin2 was connected to worker or edge through admin"
      end

      test "introspection: tier and mode per link, counters and denied", %{cl: cl} do
        w_link = link_to(cl, :admin, :worker)
        assert to_string(w_link.tier) == "worker"
        assert w_link.mode == :restricted
        assert to_string(link_to(cl, :admin, :edge).tier) == "edge"
        assert link_to(cl, :admin, :edge).mode == :restricted
        assert link_to(cl, :admin, :admin2).mode == :full
        assert link_to(cl, :worker, :admin).mode == :full
        assert link_to(cl, :worker, :edge).mode == :restricted
        assert link_to(cl, :edge, :worker).mode == :full

        for link <- [w_link, link_to(cl, :admin, :admin2)] do
          assert is_map(link[:counters]), "no counters in #{inspect(link)}"
          assert is_integer(link[:denied])
        end
      end

      test "a lower tier cannot dial up (connect defaults to false)", %{cl: cl} do
        a = node_of(cl, :admin)
        assert erl(cl, :lone, :net_adm, :ping, [a]) == :pang
        refute link_to(cl, :admin, :lone), "admin holds a link lone dialled"
        assert erl(cl, :edge, :net_adm, :ping, [node_of(cl, :admin2)]) == :pang
      end

      test "connect => true lets a worker dial; audit => true delivers and counts :audited",
           %{cl: cl} do
        au = node_of(cl, :auditor)
        assert erl(cl, :lone, :net_adm, :ping, [au]) == :pong
        assert %{mode: :restricted} = link_to(cl, :auditor, :lone)
        path = marker(cl, "audited")

        assert {{:ok, {:touched, ^au}}, _} =
                 on(cl, :lone, :try_erpc, [au, :trust_dist_probe, :forbidden_fun, [path]])

        assert File.exists?(path)
        link = link_to(cl, :auditor, :lone)
        assert count(link, :spawn_request, :audited) >= 1, "counters: #{inspect(link[:counters])}"
        lone = node_of(cl, :lone)

        assert C.eventually(
                 fn ->
                   on(cl, :auditor, :reports, [:all])
                   |> Enum.any?(&(&1[:peer] == lone and &1[:op] == :spawn_request))
                 end,
                 2_000
               ),
               "auditor logged no report about lone's spawn request"
      end

      test "same tier: everything, including :global names seen on both", %{cl: cl} do
        a = node_of(cl, :admin)
        path = marker(cl, "same-tier")

        assert {{:ok, {:touched, ^a}}, _} =
                 on(cl, :admin2, :try_erpc, [a, :trust_dist_probe, :touch, [path]])

        assert File.exists?(path)
        assert on(cl, :admin2, :spawn_link_remote, [a]) == {a, :done_remote}
        assert on(cl, :admin2, :remote_kill, [a]) == {:down, :killed}
        t = tag()
        :ok = on(cl, :admin2, :send_to, [{:victim, a}, {:same_tier, t}])
        assert C.eventually(fn -> {:same_tier, t} in on(cl, :admin, :victim_seen, []) end, 3_000)

        for {reg, look} <- [{:admin2, :admin}, {:admin, :admin2}] do
          name = {:trust_global, tag()}
          pid = on(cl, reg, :global_register, [name])

          assert C.eventually(fn -> on(cl, look, :global_lookup, [name]) == pid end, 5_000),
                 ":global name registered on #{reg} not seen on #{look}"
        end
      end
    end
  end
end

defmodule TrustDist.TrustAssertionsTest do
  @moduledoc """
  Policy assertions are checked when distribution starts: a failing one stops the node
  with a message naming `assertions` and the assertion.
  """
  use ExUnit.Case, async: false

  alias TrustDist.TestCluster, as: C

  @moduletag :tmp_dir

  @policy %{
    worker: %{registered: [:results], rpc: [{:trust_dist_probe, :allowed_fun, 1}]},
    edge: %{registered: [:results]}
  }

  setup %{tmp_dir: dir} do
    names = [C.unique("admin"), C.unique("worker"), C.unique("edge")]

    nodes =
      C.dev_cluster(dir, Enum.zip(names, [:admin, :worker, :edge]),
        tiers: [:admin, :worker, :edge]
      )

    %{node: nodes[hd(names)]}
  end

  defp boot(node, assertions) do
    C.put_config(node.dir, policy: @policy, assertions: assertions)

    task =
      Task.async(fn ->
        System.cmd(
          "erl",
          ["-name", Atom.to_string(node.node)] ++
            node.args ++ ["-noshell", "-eval", "ok, halt()."],
          stderr_to_stdout: true,
          env: [{"ERL_CRASH_DUMP_SECONDS", "0"}]
        )
      end)

    Task.await(task, 30_000)
  end

  test "assertions that hold let the node start", %{node: node} do
    {out, status} =
      boot(node, [
        {:worker, :may_not, :spawn},
        {:worker, :may, {:send, :results}},
        {:worker, :may, {:call, :trust_dist_probe, :allowed_fun, 1}},
        {:edge, :may_not, :connect}
      ])

    assert status == 0, out
  end

  for {assertion, pattern} <- [
        {{:worker, :may, :spawn}, ~S"\{worker,\s*may,\s*spawn\}"},
        {{:worker, :may_not, {:send, :results}},
         ~S"\{worker,\s*may_not,\s*\{send,\s*results\}\}"},
        {{:edge, :may, {:call, :trust_dist_probe, :allowed_fun, 1}},
         ~S"\{edge,\s*may,\s*\{call,\s*trust_dist_probe,\s*allowed_fun,\s*1\}\}"}
      ] do
    @tag assertion: assertion, pattern: pattern
    test "a failing assertion stops the boot: #{inspect(assertion)}",
         %{node: node, assertion: assertion, pattern: pattern} do
      {out, status} = boot(node, [{:worker, :may, {:send, :results}}, assertion])
      assert status != 0, "boot succeeded:\n" <> out
      assert out =~ "trust_dist configuration key 'assertions'", out
      assert out =~ Regex.compile!(pattern), out
    end
  end
end
