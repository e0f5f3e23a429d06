defmodule TrustDist.RedTeamTest do
  @moduledoc """
  The red team: a lower-tier node that, besides the Erlang API, writes hand-crafted
  distribution packets onto its own authenticated link (trust_dist_attacker, on the
  attacker's VM; the victim runs the ordinary carrier with no test hook).

  Three real nodes on loopback, keys made at test time: the victim (tier admin), the
  attacker (tier worker) and a witness (tier edge, a second lower-tier link). The victim
  exposes `results` (records what it gets), `events` (a gen_event manager with a
  recording handler) and `drain` (counts) to workers, and `pong` to edge; `victim` and
  `alias_canary` (which holds an alias) are not exposed and record what they get.

  Every case in @cases is run in turn; before and after each the test takes a snapshot of
  the victim through peer's standard-I/O channel (independent of the carrier) and
  asserts its health: the same OS process, init running, a call from the witness over
  its own link answered, the atom count unchanged, memory growth under @memory_bound, the
  denial log rate limited, and no effect: the marker file any executed payload would
  write is absent, the canaries got nothing beyond the case's own sync (or, for the
  positive controls, exactly what they must get), system processes, group leaders, links
  and monitors from the attacker, the code path, cookie, applications, global names,
  logger config, registered names and connections are as before. A case may close the
  attacker's link (fail closed); the victim then dials it again for the next case.

  Findings are collected over all cases and reported at the end in one line,
  `red team: N cases, C victim crashes, E effects`, followed by the case list; the test
  fails unless both counts are 0. Runs on this machine's OTP and again with every node on
  OTP 29 (the sid chroot of scripts/otp-chroot.sh; skipped with the reason when not built).
  """
  use ExUnit.Case, async: false

  alias TrustDist.TestCluster, as: C

  @moduletag timeout: 240_000

  @host_release C.host_release()
  @releases Enum.uniq([@host_release, "29"])

  @tiers [:admin, :worker, :edge]

  # Worker limits are set low so that the floods cross them within a short run.
  @max_monitors 500
  @max_message_size 1_048_576

  @victim_policy %{
    worker: %{
      registered: [:results, :events, :drain],
      max_message_size: @max_message_size,
      max_monitors: @max_monitors
    },
    edge: %{registered: [:pong]}
  }

  # Memory growth allowed per case. The largest legitimate holdings a case can cause on
  # the victim: one restricted link's filter tables (under 8 MiB, README "Filter memory"),
  # the receive window and read-ahead of one QUIC stream (a few MiB), packets in flight
  # between the filter and the VM (bounded by the receive credit, at most a few
  # max_message_size packets = a few MiB), 20,000 delivered 300-byte messages still in
  # `drain`'s queue (~8 MiB), and allocator slack the VM does not return at once. 64 MiB
  # is about twice their sum; an unbounded hold (a zip bomb inflated, a huge length
  # pre-allocated, a fragment buffer that never ends) goes far past it.
  @memory_bound 64 * 1024 * 1024

  # Denial reports are at most 10 per link and second (README); a case that reconnects
  # starts a new link, so allow one extra second's worth and a little slack.
  @reports_per_second 10

  # {case, group, options}. Options: deliver: [entries `results` must record (and may)],
  # drain: messages `drain` must count, held: monitors the attacker must then hold on the
  # exposed names, passes: packets of a hostile case the policy lets through (all others
  # must be refused), may_pass: how many more may pass, min_release: run only from that
  # OTP release on, settle: ms to wait for the case's packets to be judged.
  @cases [
    # Positive controls: these reach the exposed name, so the checks below can see a
    # delivery. The `_tt` one must arrive without its trace token.
    {:control_reg_send, :control, deliver: [{:info, {:control, :tag}}]},
    {:control_reg_send_tt, :control, deliver: [{:info, {:control_tt, :tag}}]},
    {:control_altact_name, :control,
     deliver: [{:info, {:control_altact, :tag}}], min_release: 28},
    # Header forms a restricted link never carries, framing and size.
    {:header_atom_cache_new_atom, :header, []},
    {:header_atom_cache_empty, :header, []},
    {:header_fragment_absurd_count, :header, []},
    {:header_fragment_orphan, :header, []},
    {:header_fragment_flood, :header, []},
    {:header_unknown_byte, :header, []},
    {:header_version_only, :header, []},
    {:header_pass_through_only, :header, []},
    {:garbage_random, :header, []},
    {:truncated_control, :header, []},
    {:truncated_payload, :header, []},
    {:trailing_bytes, :header, []},
    {:extra_term, :header, []},
    {:payload_without_version, :header, []},
    {:oversized_packet, :header, []},
    {:oversized_flood, :header, settle: 20_000},
    # Invalid external terms and nesting.
    {:etf_unknown_tag, :etf, []},
    {:etf_compressed, :etf, []},
    {:etf_local_ext, :etf, []},
    {:etf_binary_length_past_end, :etf, []},
    {:etf_string_length_past_end, :etf, []},
    {:etf_list_huge_count, :etf, []},
    {:etf_tuple_huge_arity, :etf, []},
    {:etf_map_huge_count, :etf, []},
    {:etf_big_huge_length, :etf, []},
    {:etf_atom_bad_utf8, :etf, []},
    {:etf_atom_too_long, :etf, []},
    {:etf_atom_latin1_new, :etf, []},
    {:etf_atom_cache_ref_in_pass_through, :etf, []},
    {:etf_bit_binary_bad_bits, :etf, []},
    {:etf_float_nan, :etf, []},
    {:etf_improper_nesting_in_control, :etf, []},
    {:etf_deep_list_payload, :etf, []},
    {:etf_deep_tuple_payload, :etf, []},
    {:etf_deep_map_payload, :etf, []},
    {:etf_deep_exit_reason, :etf, []},
    {:etf_control_not_tuple, :etf, []},
    {:etf_control_empty_tuple, :etf, []},
    {:etf_control_op_not_integer, :etf, []},
    {:etf_control_op_bignum, :etf, []},
    {:etf_control_wrong_arity, :etf, []},
    # New atoms and funs.
    {:atom_new_in_payload, :atoms_funs, []},
    {:atom_new_as_name, :atoms_funs, []},
    {:atom_new_in_control, :atoms_funs, []},
    {:atom_new_as_monitor_name, :atoms_funs, []},
    {:atom_new_as_exit_reason, :atoms_funs, []},
    {:atom_new_as_node_of_pid, :atoms_funs, []},
    {:atom_flood, :atoms_funs, []},
    {:fun_export_os_cmd, :atoms_funs, []},
    {:fun_local, :atoms_funs, []},
    # Forged identities in payloads.
    {:payload_victim_pid, :forged_identity, []},
    {:payload_guessed_init_pid, :forged_identity, []},
    {:payload_victim_port, :forged_identity, []},
    {:payload_victim_ref, :forged_identity, []},
    {:payload_victim_alias, :forged_identity, []},
    {:payload_third_node_pid, :forged_identity, []},
    {:payload_witness_pid, :forged_identity, []},
    # Spoofed senders.
    {:spoof_sender_witness, :spoofed_sender, []},
    {:spoof_sender_victim_own, :spoofed_sender, []},
    {:spoof_sender_victim_init, :spoofed_sender, []},
    {:spoof_sender_third_node, :spoofed_sender, []},
    {:spoof_sender_stale_creation, :spoofed_sender, []},
    {:spoof_monitor_exit_from_victim, :spoofed_sender, []},
    {:spoof_link_from_witness, :spoofed_sender, []},
    # Every control operation 1..37 (and beyond) with hostile arguments.
    {:op01_link_init, :control_op, []},
    {:op01_link_guessed_init, :control_op, []},
    {:op01_link_victim, :control_op, []},
    {:op02_send_init_stop, :control_op, []},
    {:op02_send_victim, :control_op, []},
    {:op03_exit_victim_kill, :control_op, []},
    {:op03_exit_results_parent, :control_op, []},
    {:op04_unlink_old, :control_op, []},
    {:op05_node_link, :control_op, []},
    {:op06_reg_send_init_stop, :control_op, []},
    {:op06_reg_send_unlisted, :control_op, []},
    {:op07_group_leader_victim, :control_op, []},
    {:op07_group_leader_results, :control_op, []},
    {:op08_exit2_victim_kill, :control_op, []},
    {:op08_exit2_init_kill, :control_op, []},
    {:op08_exit2_results_kill, :control_op, []},
    {:op09_unassigned, :control_op, []},
    {:op10_unassigned, :control_op, []},
    {:op11_unassigned, :control_op, []},
    {:op12_send_tt_victim, :control_op, []},
    {:op13_exit_tt_victim, :control_op, []},
    {:op14_unassigned, :control_op, []},
    {:op15_unassigned, :control_op, []},
    {:op16_reg_send_tt_init, :control_op, []},
    {:op17_unassigned, :control_op, []},
    {:op18_exit2_tt_victim, :control_op, []},
    {:op19_monitor_system_names, :control_op, []},
    {:op19_monitor_guessed_pid, :control_op, []},
    {:op19_monitor_victim_ref, :control_op, []},
    {:op19_monitor_reused_ref, :control_op, []},
    {:op20_demonitor_unknown, :control_op, []},
    {:op21_monitor_p_exit_forged, :control_op, []},
    {:op21_monitor_p_exit_by_name, :control_op, []},
    {:op22_send_sender_victim, :control_op, []},
    {:op22_send_sender_init_stop, :control_op, []},
    {:op23_send_sender_tt_victim, :control_op, []},
    {:op24_payload_exit_victim, :control_op, []},
    {:op25_payload_exit_tt_victim, :control_op, []},
    {:op26_payload_exit2_victim, :control_op, []},
    {:op26_payload_exit2_results, :control_op, []},
    {:op26_payload_exit2_init, :control_op, []},
    {:op27_payload_exit2_tt_victim, :control_op, []},
    {:op28_payload_monitor_p_exit_forged, :control_op, []},
    {:op29_spawn_request_os_cmd, :control_op, []},
    {:op29_spawn_request_erpc, :control_op, []},
    {:op29_spawn_request_link_monitor, :control_op, []},
    {:op29_spawn_request_victim_group_leader, :control_op, []},
    {:op29_spawn_request_rpc_legacy, :control_op, []},
    {:op30_spawn_request_tt, :control_op, []},
    {:op31_spawn_reply_unknown, :control_op, []},
    {:op32_spawn_reply_tt_unknown, :control_op, []},
    {:op33_alias_send_guessed, :control_op, []},
    {:op34_alias_send_tt_guessed, :control_op, []},
    {:op35_unlink_id_unknown, :control_op, []},
    {:op36_unlink_id_ack_unknown, :control_op, []},
    {:op37_altact_exit_victim, :control_op, []},
    {:op37_altact_exit_prio_results, :control_op, []},
    {:op37_altact_name_init_stop, :control_op, []},
    {:op37_altact_alias_guessed, :control_op, []},
    {:op37_altact_pid_victim, :control_op, []},
    {:op37_altact_token_init, :control_op, []},
    {:op37_altact_unknown_flags, :control_op, []},
    {:op37_altact_alias_and_name, :control_op, []},
    {:op38_and_up_unknown, :control_op, []},
    # THREATS.md classes 1-6 through the exposed names and the system names.
    {:system_replace_state_results, :threats, []},
    {:system_suspend_results, :threats, []},
    {:system_terminate_results, :threats, []},
    {:system_messages_to_system_names, :threats, []},
    {:forged_exit_from_parent, :threats, []},
    {:forged_down_and_nodedown, :threats, []},
    {:io_request_results, :threats, []},
    {:io_request_user_and_gl, :threats, []},
    {:supervisor_calls_results, :threats, []},
    {:gen_event_admin_events, :threats, []},
    {:gen_event_stop_events, :threats, []},
    {:gen_event_bad_reply_tag, :threats, []},
    {:gen_call_reply_to_other, :threats, []},
    {:application_controller_stop, :threats, []},
    {:rex_call_and_cast, :threats, []},
    {:net_kernel_spawn_and_disconnect, :threats, []},
    {:global_hijack_and_funs, :threats, []},
    {:pg_injection, :threats, []},
    {:code_server_load, :threats, []},
    {:file_server_make_dir, :threats, []},
    {:logger_reconfigure, :threats, []},
    {:auth_set_cookie, :threats, []},
    {:init_stop_all_ways, :threats, []},
    {:inet_db_and_shell, :threats, []},
    {:disconnect_witness_via_global, :threats, []},
    # Floods.
    {:flood_spawn_requests, :flood, settle: 20_000},
    # The first max_monitors are real monitors (a GenServer.call needs one); the rest are
    # answered noproc.
    {:flood_monitors, :flood, held: @max_monitors, passes: @max_monitors, settle: 20_000},
    {:flood_links, :flood, settle: 20_000},
    {:flood_messages_exposed, :flood, drain: 20_000, settle: 30_000},
    {:flood_denials_log, :flood, settle: 20_000},
    # Guessing <0.N.0> may hit a pid the victim itself handed to the attacker earlier in
    # the run (the caller of each of its net_adm:ping), which the policy lets the
    # attacker answer; any other guess is refused.
    {:flood_guessed_pids, :flood, may_pass: 50, settle: 20_000},
    {:flood_guessed_aliases, :flood, settle: 20_000}
  ]

  # Run first and not counted: the first denial, close and reconnect load code on the
  # victim (logger formatting, the link's restart path); a module loaded then may create
  # atoms that are no attacker's doing.
  @warm_up [:control_reg_send, :op06_reg_send_init_stop, :header_unknown_byte, :flood_links]

  # The whole run stops (and fails, with the cases not run counted) past this: every
  # wait below is bounded, and this bounds their sum.
  @run_budget 150_000

  # Snapshot keys that must not change at all in a case.
  @unchanged [
    :init_status,
    :whereis,
    :registered,
    :group_leaders,
    :links_from_attacker,
    :results_status,
    :victim_seen,
    :alias_seen,
    :events_handlers,
    :events_seen,
    :code_path,
    :cookie,
    :apps,
    :global_names,
    :logger_level,
    :logger_handlers,
    :witness_connection
  ]

  for release <- @releases do
    @tag release: release
    if release != @host_release, do: @tag(:matrix)

    unless C.release_available?(release) do
      @tag skip: "OTP #{release} chroot not built (scripts/otp-chroot.sh ensure #{release})"
    end

    @tag :tmp_dir
    test "red team on OTP #{release}: every case leaves the victim alive and unaffected",
         %{release: release, tmp_dir: dir} do
      cl = boot(release, dir)

      try do
        red_team(cl)
      after
        # Peers run unlinked (started from tasks); a replaced attacker is remembered here.
        for peer <- Map.values(cl.peers) ++ Process.get(:redteam_attackers, []), do: C.stop(peer)
        # The deployment's keys were made for this run only.
        File.rm_rf(dir)
      end
    end
  end

  # ---------------------------------------------------------------------------------------
  # The deployment

  defp boot(release, dir) do
    roles = [victim: :admin, attacker: :worker, witness: :edge]
    names = Map.new(roles, fn {role, _} -> {role, C.unique("rt#{role}")} end)

    nodes =
      C.dev_cluster(dir, Enum.map(roles, fn {role, tier} -> {names[role], tier} end),
        tiers: @tiers
      )

    nodes = Map.new(roles, fn {role, _} -> {role, nodes[names[role]]} end)
    C.put_config(nodes.victim.dir, policy: @victim_policy)
    ebin = C.release_ebin(release)

    peers =
      roles
      |> Enum.map(fn {role, _} ->
        Task.async(fn ->
          {role, C.start_release(nodes[role], release, ebin: ebin, link: false)}
        end)
      end)
      |> Task.await_many(60_000)
      |> Map.new()

    markers = Path.join(dir, "markers")
    File.mkdir_p!(markers)

    %{
      release: release,
      ebin: ebin,
      nodes: nodes,
      peers: peers,
      node: Map.new(nodes, fn {role, n} -> {role, n.node} end),
      markers: markers
    }
  end

  # ---------------------------------------------------------------------------------------
  # The run

  defp red_team(cl) do
    t0 = System.monotonic_time(:millisecond)
    os_pid = C.os_pid(cl.peers.victim)
    base = victim(cl, :redteam_fixtures, [])
    # The victim dials both lower tiers (they may not dial up).
    for role <- [:attacker, :witness] do
      assert victim_erl(cl, :net_adm, :ping, [cl.node[role]]) == :pong
    end

    assert await_attacker_link(cl), "the attacker holds no link to the victim"

    ctx =
      Map.merge(base, %{
        victim: cl.node.victim,
        witness: cl.node.witness,
        witness_pid: C.call(cl.peers.witness, :trust_dist_probe, :park, [])
      })

    cases = Enum.filter(@cases, &(runs_on?(&1, cl.release) and selected?(&1)))
    cases_by_name = Map.new(@cases, fn {name, _, _} = c -> {name, c} end)

    cl =
      Enum.reduce(@warm_up, cl, fn name, cl ->
        {_, cl} = run_case(cl, ctx, cases_by_name[name], os_pid)
        cl
      end)

    {_cl, results} =
      Enum.reduce_while(cases, {cl, []}, fn c, {cl, acc} ->
        {result, cl} = run_case(cl, ctx, c, os_pid)
        acc = [result | acc]
        over = System.monotonic_time(:millisecond) - t0 > @run_budget

        if result.crashed or over,
          do: {:halt, {cl, acc}},
          else: {:cont, {cl, acc}}
      end)

    results = Enum.reverse(results)

    elapsed = System.monotonic_time(:millisecond) - t0
    crashes = Enum.count(results, & &1.crashed)
    effects = Enum.count(results, &(&1.problems != [] and not &1.crashed))
    not_run = length(cases) - length(results)
    summary = "red team: #{length(results)} cases, #{crashes} victim crashes, #{effects} effects"

    IO.puts(
      "\nOTP #{cl.release}, #{div(elapsed, 1000)} s, memory bound #{div(@memory_bound, 1_048_576)} MiB per case\n" <>
        summary <> "\n" <> case_list(results)
    )

    problems =
      for %{problems: [_ | _]} = r <- results do
        "  #{r.name}: " <> Enum.join(r.problems, "; ")
      end

    assert crashes == 0 and effects == 0 and not_run == 0,
           summary <> " (#{not_run} not run)\n" <> Enum.join(problems, "\n")
  end

  # REDTEAM_CASES=name,name,... runs only those (when chasing one finding).
  defp selected?({name, _, _}) do
    case System.get_env("REDTEAM_CASES") do
      nil -> true
      "" -> true
      list -> Atom.to_string(name) in String.split(list, ",")
    end
  end

  defp runs_on?({_name, _group, opts}, release) do
    case opts[:min_release] do
      nil -> true
      min -> String.to_integer(release) >= min
    end
  end

  defp case_list(results) do
    results
    |> Enum.group_by(& &1.group)
    |> Enum.sort_by(fn {_group, [first | _]} -> first.index end)
    |> Enum.map_join("\n", fn {group, rs} ->
      "  #{group}: " <> Enum.map_join(rs, ", ", &"#{&1.name} (#{&1.link})")
    end)
  end

  # One case: snapshot, attack, wait until every packet was judged (or the link closed),
  # reconnect if needed, snapshot, compare.
  defp run_case(cl, ctx, {name, group, opts}, os_pid) do
    tag = System.unique_integer([:positive])
    marker = Path.join(cl.markers, "#{name}-#{tag}")
    ctx = Map.merge(ctx, %{tag: tag, marker: String.to_charlist(marker)})
    before = snapshot(cl)
    reports_before = length(victim(cl, :reports, [:trust_dist_denied]))
    drain_before = if opts[:drain], do: victim(cl, :drain_count, [])
    t0 = System.monotonic_time(:millisecond)
    if System.get_env("REDTEAM_TRACE"), do: IO.puts(:stderr, "red team: #{name}")

    sent = C.call(cl.peers.attacker, :trust_dist_attacker, :attack, [name, ctx], 120_000)
    trace("attack sent #{inspect(sent)}", t0)
    _ = C.call(cl.peers.attacker, :trust_dist_attacker, :sync, [cl.node.victim, tag])
    trace("sync sent", t0)

    settled =
      victim(cl, :redteam_settle, [
        tag,
        cl.node.attacker,
        before.attacker_connection,
        Keyword.get(opts, :settle, 5_000)
      ])

    trace("settled #{settled}", t0)

    {link, problems} =
      case settled do
        :synced -> {:kept, []}
        :closed -> {:closed, reconnect(cl)}
        :timeout -> {:stalled, ["the link neither judged the case's packets nor closed"]}
      end

    # A link the victim cannot get back (or one that stalled) would spoil every case
    # after it: replace the attacker's VM (same name and keys) before going on.
    cl = if problems == [], do: cl, else: fresh_attacker(cl)

    # Room for an effect that comes late (a spawned process writing the marker).
    Process.sleep(100)
    elapsed = System.monotonic_time(:millisecond) - t0

    {crashed, problems} =
      case health(cl, os_pid, tag) do
        :ok -> {false, problems}
        {:crashed, why} -> {true, problems ++ [why]}
        {:unhealthy, why} -> {false, problems ++ [why]}
      end

    problems =
      if crashed do
        problems
      else
        after_ = snapshot(cl)
        reports = length(victim(cl, :reports, [:trust_dist_denied])) - reports_before

        closed_by_vm =
          if link == :closed and after_.filter_closes == before.filter_closes,
            do: ["the link closed, but not by the filter: the VM decoded a packet it refused"],
            else: []

        # A hostile case the link survived must have had every packet refused by the
        # filter (not merely come to nothing on the victim), but those the case says the
        # policy lets through; a control case must have had none refused.
        hostile = opts[:deliver] == nil and opts[:drain] == nil
        refused = after_.attacker_refused - before.attacker_refused
        {:sent, n} = with({:sent, _} <- sent, do: sent, else: (_ -> {:sent, 0}))
        due = if hostile, do: n - Keyword.get(opts, :passes, 0), else: 0
        slack = Keyword.get(opts, :may_pass, 0)

        refusals =
          if link == :kept and (refused > due or refused < due - slack),
            do: ["the filter refused #{refused} of the case's #{n} packets, not #{due}"],
            else: []

        problems ++
          closed_by_vm ++
          refusals ++
          compare(cl, before, after_, opts, tag) ++
          marker_problems(marker) ++
          report_problems(reports, elapsed) ++
          drain_problems(cl, opts[:drain], drain_before) ++
          sent_problems(sent)
      end

    {%{
       name: name,
       group: group,
       index: Enum.find_index(@cases, &(elem(&1, 0) == name)),
       link: link,
       crashed: crashed,
       problems: problems
     }, cl}
  end

  defp fresh_attacker(cl) do
    C.stop(cl.peers.attacker)
    node = cl.nodes.attacker
    [name, _] = node.node |> Atom.to_string() |> String.split("@")

    C.eventually(fn ->
      {:ok, names} = :erl_epmd.names(~c"127.0.0.1")
      not Enum.any?(names, fn {n, _} -> to_string(n) == name end)
    end)

    peer = C.start_release(node, cl.release, ebin: cl.ebin, link: false)
    Process.put(:redteam_attackers, [peer | Process.get(:redteam_attackers, [])])
    cl = put_in(cl.peers.attacker, peer)
    :pong = victim_erl(cl, :net_adm, :ping, [cl.node.attacker])
    await_attacker_link(cl)
    cl
  end

  defp trace(what, t0) do
    if System.get_env("REDTEAM_TRACE"),
      do: IO.puts(:stderr, "  #{what} at #{System.monotonic_time(:millisecond) - t0} ms")
  end

  defp sent_problems({:sent, _}), do: []
  defp sent_problems(other), do: ["the attacker could not write its packets: #{inspect(other)}"]

  # The victim dials the attacker again (a lower tier may not dial up) and a sync makes
  # sure the new link carries packets.
  defp reconnect(cl) do
    ok =
      C.eventually(
        fn ->
          victim_erl(cl, :net_adm, :ping, [cl.node.attacker]) == :pong and
            await_attacker_link(cl)
        end,
        10_000
      )

    tag = System.unique_integer([:positive])
    _ = ok && C.call(cl.peers.attacker, :trust_dist_attacker, :sync, [cl.node.victim, tag])
    conn = victim(cl, :connection_id, [cl.node.attacker])

    cond do
      not ok ->
        ["the victim could not reconnect to the attacker"]

      victim(cl, :redteam_settle, [tag, cl.node.attacker, conn, 5_000]) != :synced ->
        ["the new link carries nothing"]

      true ->
        []
    end
  end

  defp await_attacker_link(cl) do
    C.eventually(
      fn ->
        C.call(cl.peers.attacker, :trust_dist_server, :links, [])
        |> Enum.any?(&(elem(&1, 0) == cl.node.victim))
      end,
      5_000
    )
  end

  # Alive (the same OS process, init running) and answering the witness over its own
  # link.
  defp health(cl, os_pid, tag) do
    status =
      try do
        {C.os_pid(cl.peers.victim), C.call(cl.peers.victim, :init, :get_status, [], 5_000)}
      catch
        kind, why -> {:unreachable, kind, why}
      end

    case status do
      {^os_pid, {:started, :started}} ->
        witness =
          try do
            C.call(cl.peers.witness, :trust_dist_probe, :server_call, [
              :pong,
              cl.node.victim,
              {:ping, tag}
            ])
          catch
            kind, why -> {kind, why}
          end

        if witness == {:pong, cl.node.victim, {:ping, tag}},
          do: :ok,
          else: {:unhealthy, "the witness got no answer over its link: #{inspect(witness)}"}

      {^os_pid, other} ->
        {:crashed, "init is #{inspect(other)}"}

      other ->
        {:crashed, "the victim is gone: #{inspect(other)}"}
    end
  end

  defp compare(cl, before, after_, opts, tag) do
    changed =
      for key <- @unchanged, before[key] != after_[key] do
        "#{key} changed: #{inspect(before[key], limit: 20)} -> #{inspect(after_[key], limit: 20)}"
      end

    atoms =
      if after_.atoms != before.atoms,
        do: [
          "atom count #{before.atoms} -> #{after_.atoms}: " <>
            inspect(victim(cl, :atoms_since, [before.atoms, 20]))
        ],
        else: []

    grown = after_.memory - before.memory

    memory =
      if grown > @memory_bound,
        do: [
          "memory grew by #{div(grown, 1_048_576)} MiB (bound #{div(@memory_bound, 1_048_576)})"
        ],
        else: []

    processes =
      if after_.processes - before.processes > 20,
        do: ["#{after_.processes - before.processes} more processes"],
        else: []

    # Monitors the attacker holds: on the names exposed to it, at most max_monitors in
    # all; on anything else, none that were not there before.
    exposed = [:results, :events, :drain]
    {held, others} = Enum.split_with(after_.monitors_from_attacker, &(elem(&1, 0) in exposed))
    held = held |> Enum.map(&elem(&1, 1)) |> Enum.sum()

    others_before =
      Enum.reject(before.monitors_from_attacker, &(elem(&1, 0) in exposed)) |> Map.new()

    monitors =
      for(
        {name, n} <- others,
        n > Map.get(others_before, name, 0),
        do: "the attacker monitors #{name} (#{n})"
      ) ++
        cond do
          held > @max_monitors ->
            ["the attacker holds #{held} monitors (max_monitors #{@max_monitors})"]

          opts[:held] && held != opts[:held] ->
            ["the attacker holds #{held} monitors, not #{opts[:held]}"]

          true ->
            []
        end

    connected =
      case after_.connected -- before.connected do
        [] -> []
        new -> ["the victim connected to #{inspect(new)}"]
      end

    changed ++
      atoms ++
      memory ++
      processes ++ monitors ++ connected ++ results_problems(before, after_, opts, tag)
  end

  # `results` may get the syncs and, in a control case, exactly what the case delivers.
  defp results_problems(before, after_, opts, tag) do
    new = Enum.drop(after_.results_seen, length(before.results_seen))
    expected = for entry <- Keyword.get(opts, :deliver, []), do: put_tag(entry, tag)
    unexpected = Enum.reject(new, &(match?({:info, {:sync, _}}, &1) or &1 in expected))
    missing = expected -- new

    if(unexpected == [], do: [], else: ["results got #{inspect(unexpected, limit: 10)}"]) ++
      if missing == [], do: [], else: ["results did not get #{inspect(missing)} (control)"]
  end

  defp put_tag({:info, {what, :tag}}, tag), do: {:info, {what, tag}}

  defp marker_problems(marker) do
    if File.exists?(marker),
      do: ["code ran: the marker #{Path.basename(marker)} exists"],
      else: []
  end

  defp report_problems(reports, elapsed_ms) do
    bound = @reports_per_second * (div(elapsed_ms, 1000) + 2) + 10

    if reports > bound,
      do: ["#{reports} denial reports in #{elapsed_ms} ms (bound #{bound}): not rate limited"],
      else: []
  end

  defp drain_problems(_cl, nil, _before), do: []

  defp drain_problems(cl, n, before) do
    got =
      C.eventually(
        fn ->
          count = victim(cl, :drain_count, [])
          if count - before >= n, do: count - before
        end,
        10_000
      )

    if got == n, do: [], else: ["drain counted #{inspect(got)} of #{n} flood messages"]
  end

  defp snapshot(cl), do: victim(cl, :redteam_snapshot, [cl.node.attacker, cl.node.witness])

  defp victim(cl, fun, args),
    do: C.call(cl.peers.victim, :trust_dist_probe, fun, args, 30_000)

  defp victim_erl(cl, m, f, args), do: C.call(cl.peers.victim, m, f, args, 15_000)
end
