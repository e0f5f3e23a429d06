#!/usr/bin/env escript
%%! -noinput
%% Captures real distribution packets between two trust_dist nodes of one OTP release and
%% stores them as test vectors in native/proto/tests/vectors/otpNN/. Run it through
%% scripts/capture-vectors.sh (which builds nothing; `make build' first).
%%
%%   hi@127.0.0.1 (tier admin) and lo@127.0.0.1 (tier worker), from
%%   `bin/trust-dist dev-cluster DIR hi@..:admin lo@..:worker --tiers admin,worker'.
%%   hi's link to lo is restricted, so neither atom cache nor fragments are negotiated and
%%   every packet is in the 112 pass-through form. Both nodes are started with `peer' over
%%   standard_io (OTP 27/29 nodes through scripts/otp-chroot.sh), so the script itself is
%%   not a distributed node. On hi, a tracer records the input handler's
%%   erlang:dist_ctrl_put_data/2 calls (direction `in', lo -> hi) and what
%%   erlang:dist_ctrl_get_data/1 returns to the controller (direction `out', hi -> lo).
%%
%% Usage: capture_vectors.escript ROOT RELEASE OUTDIR
-mode(compile).

-define(M, trust_dist_capture).
-define(QUIET, 400).

main([Root, Release, OutDir]) ->
    try run(Root, Release, OutDir)
    catch C:R:St ->
            io:format(standard_error, "capture failed: ~p:~tp~n~tp~n", [C, R, St]),
            halt(1)
    end,
    halt(0);
main(["--coverage", OutDir]) ->
    io:put_chars(coverage(OutDir)),
    halt(0);
main(_) ->
    io:format(standard_error, "usage: capture_vectors.escript ROOT RELEASE OUTDIR~n"
              "       capture_vectors.escript --coverage OUTDIR~n", []),
    halt(2).

%%% ------------------------------------------------------------------ set-up

run(Root, Release, OutDir) ->
    Host = erlang:system_info(otp_release),
    Work = filename:join(["/tmp", "trust_dist_capture_" ++ Release ++ "_" ++ os:getpid()]),
    ok = filelib:ensure_dir(filename:join(Work, "x")),
    Script = filename:join(Root, "scripts/otp-chroot.sh"),
    {Ebin, CapEbin} = ebins(Root, Release, Host, Script),
    Suffix = integer_to_list(erlang:unique_integer([positive])) ++ os:getpid(),
    HiName = "hi" ++ Release ++ "x" ++ Suffix,
    LoName = "lo" ++ Release ++ "x" ++ Suffix,
    Cluster = filename:join(Work, "cluster"),
    cmd(filename:join(Root, "bin/trust-dist"),
        ["dev-cluster", Cluster, HiName ++ "@127.0.0.1:admin", LoName ++ "@127.0.0.1:worker",
         "--tiers", "admin,worker", "--ebin", Ebin]),
    Exec = case Release of
               Host -> undefined;
               _ -> {Script, ["erl", Release]}
           end,
    Hi = start_node(Cluster, HiName, Exec, CapEbin),
    %% EPMD hands out creations from the clock in seconds: two nodes registered in the same
    %% second get the same creation. Wait, so that pids of hi and lo differ in creation too.
    timer:sleep(1100),
    Lo = start_node(Cluster, LoName, Exec, CapEbin),
    try
        capture(Release, Hi, Lo, OutDir)
    after
        catch peer:stop(element(1, Hi)),
        catch peer:stop(element(1, Lo)),
        _ = os:cmd("rm -rf '" ++ Work ++ "'")
    end.

%% The trust_dist ebin for the release, and a directory with the capture module compiled
%% by that release's own compiler.
ebins(Root, Release, Release, _Script) ->
    Ebin = filename:join(Root, "_build/dev/lib/trust_dist/ebin"),
    filelib:is_file(filename:join(Ebin, "trust_dist.beam"))
        orelse error({not_built, Ebin, "run `make build' first"}),
    Cap = filename:join(Root, "_build/capture-otp" ++ Release ++ "/capture"),
    ok = filelib:ensure_dir(filename:join(Cap, "x")),
    cmd(os:find_executable("erlc"),
        ["-o", Cap, filename:join(Root, "test/capture/trust_dist_capture.erl")]),
    {Ebin, Cap};
ebins(Root, Release, _Host, Script) ->
    Lib = filename:join(Root, "_build/capture-otp" ++ Release ++ "/lib/trust_dist"),
    Ebin = filename:join(Lib, "ebin"),
    Cap = filename:join(Root, "_build/capture-otp" ++ Release ++ "/capture"),
    ok = filelib:ensure_dir(filename:join(Ebin, "x")),
    ok = filelib:ensure_dir(filename:join(Cap, "x")),
    Priv = filename:join(Lib, "priv"),
    case file:read_link_info(Priv) of
        {ok, _} -> ok;
        _ -> ok = file:make_symlink(filename:join(Root, "priv"), Priv)
    end,
    {ok, _} = file:copy(filename:join(Root, "_build/dev/lib/trust_dist/ebin/trust_dist.app"),
                        filename:join(Ebin, "trust_dist.app")),
    cmd(Script, ["erlc", Release, "-o", Ebin | filelib:wildcard(filename:join(Root, "erl_src/*.erl"))]),
    cmd(Script, ["erlc", Release, "-o", Cap, filename:join(Root, "test/capture/trust_dist_capture.erl")]),
    {Ebin, Cap}.

cmd(Prog, Args) ->
    Port = open_port({spawn_executable, Prog},
                     [{args, Args}, exit_status, stderr_to_stdout, binary]),
    cmd_loop(Port, Prog, Args, []).

cmd_loop(Port, Prog, Args, Acc) ->
    receive
        {Port, {data, D}} -> cmd_loop(Port, Prog, Args, [D | Acc]);
        {Port, {exit_status, 0}} -> ok;
        {Port, {exit_status, S}} ->
            error({command_failed, Prog, Args, S, iolist_to_binary(lists:reverse(Acc))})
    end.

%% The node's vm.args without -name (peer sets it), plus the capture module's directory.
start_node(Cluster, Name, Exec, CapEbin) ->
    {ok, VmArgs} = file:read_file(filename:join([Cluster, Name, "vm.args"])),
    Args = lists:append(
             [string:split(L, " ", leading)
              || L <- string:split(binary_to_list(VmArgs), "\n", all),
                 L =/= "", hd(L) =/= $#,
                 not lists:prefix("-name ", L), not lists:prefix("-sname ", L)]),
    Opts0 = #{name => list_to_atom(Name), host => "127.0.0.1", longnames => true,
              connection => standard_io, args => Args ++ ["-pa", CapEbin],
              wait_boot => 30000},
    Opts = case Exec of
               undefined -> Opts0;
               {Prog, EArgs} -> Opts0#{exec => {Prog, EArgs}}
           end,
    {ok, Peer, Node} = peer:start_link(Opts),
    {Peer, Node}.

%%% ------------------------------------------------------------------ the capture

call({Peer, _}, F, A) -> peer:call(Peer, ?M, F, A, 60000).
do(N, Actor, F, A) -> call(N, do, [Actor, F, A, 10000]).
do_tt(N, Actor, F, A) -> call(N, do_tt, [Actor, F, A, 10000]).
actor(N) -> call(N, new_actor, [[trap_exit]]).
actor(N, Opts) -> call(N, new_actor, [Opts]).

capture(Release, {_, HiNode} = Hi, {_, LoNode} = Lo, OutDir) ->
    ok = call(Hi, start_tracer, []),
    HiInfo = call(Hi, info, []),
    LoInfo = call(Lo, info, []),
    HT = call(Hi, start_target, []),
    LT = call(Lo, start_target, []),
    HB = actor(Hi),          % hi's active party (links, monitors, calls, spawns towards lo)
    HS = actor(Hi),          % hi's passive party (exits, group leader)
    LA = actor(Lo),          % lo's active party
    HiThings = call(Hi, local_things, []),
    Altact = list_to_integer(Release) >= 28,
    Steps =
        [{connect, "lo: net_adm:ping(hi) (first contact; gen_server:call of {is_auth, lo} to hi's net_kernel)",
          fun() -> pong = do(Lo, LA, op_ping, [HiNode]) end,
          [{in, [19], "monitor_p_by_name_net_kernel"}, {in, [6], "reg_send_net_kernel_is_auth"},
           {in, [20], "demonitor_p_by_name_net_kernel"}, {out, [22, 33, 37], "is_auth_reply"}]},
         {reg_send, "lo: {cap_target, hi} ! Msg",
          fun() -> ok = do(Lo, LA, op_reg_send, [cap_target, HiNode, {hello, reg_send}]) end,
          [{in, [6], "reg_send"}]},
         {send_sender, "lo: HiPid ! Msg",
          fun() -> ok = do(Lo, LA, op_send, [HT, {hello, send_sender}]) end,
          [{in, [22], "send_sender"}]},
         {link, "lo: link(HiPid)",
          fun() -> true = do(Lo, LA, op_link, [HT]) end,
          [{in, [1], "link"}]},
         {unlink, "lo: unlink(HiPid) after link; hi acknowledges",
          fun() -> true = do(Lo, LA, op_unlink, [HT]) end,
          [{in, [35], "unlink_id"}, {out, [36], "unlink_id_ack"}]},
         {hi_link, "hi: link(LoPid)",
          fun() -> true = do(Hi, HB, op_link, [LA]) end,
          [{out, [1], "link"}]},
         {hi_unlink, "hi: unlink(LoPid) after link; lo acknowledges",
          fun() -> true = do(Hi, HB, op_unlink, [LA]) end,
          [{out, [35], "unlink_id"}, {in, [36], "unlink_id_ack"}]},
         {group_leader, "lo: group_leader(LoPid, HiPid)",
          fun() -> true = do(Lo, LA, op_group_leader, [LA, HS]) end,
          [{in, [7], "group_leader"}]},
         {monitor_pid, "lo: erlang:monitor(process, HiPid), then erlang:demonitor(Ref)",
          fun() -> Ref = do(Lo, LA, op_monitor, [HT]), true = do(Lo, LA, op_demonitor, [Ref]) end,
          [{in, [19], "monitor_p_by_pid"}, {in, [20], "demonitor_p_by_pid"}]},
         {monitor_name, "lo: erlang:monitor(process, {cap_target, hi}), then erlang:demonitor(Ref)",
          fun() ->
                  Ref = do(Lo, LA, op_monitor, [{cap_target, HiNode}]),
                  true = do(Lo, LA, op_demonitor, [Ref])
          end,
          [{in, [19], "monitor_p_by_name"}, {in, [20], "demonitor_p_by_name"}]},
         {payload_exit, "lo: a process linked to a hi process (trapping exits) exits with {capture, link_exit_reason}",
          fun() ->
                  LC = actor(Lo, []),
                  true = do(Lo, LC, op_link, [HS]),
                  ok = call(Lo, stop_actor, [LC, {capture, link_exit_reason}])
          end,
          [{in, [24], "payload_exit"}]},
         {payload_exit2, "lo: exit(HiPid, {capture, exit2_reason}) (the target traps exits)",
          fun() -> true = do(Lo, LA, op_exit, [HS, {capture, exit2_reason}]) end,
          [{in, [26], "payload_exit2"}]},
         {payload_exit2_kill, "lo: exit(HiPid, kill)",
          fun() -> HK = actor(Hi, []), true = do(Lo, LA, op_exit, [HK, kill]) end,
          [{in, [26], "payload_exit2_kill"}]},
         {hi_exit_linked, "lo links to a hi process, which then exits with {capture, hi_exit_reason}",
          fun() ->
                  HE = actor(Hi, []),
                  true = do(Lo, LA, op_link, [HE]), settle(),
                  ok = call(Hi, stop_actor, [HE, {capture, hi_exit_reason}])
          end,
          [{out, [24], "payload_exit"}]},
         {hi_down, "lo monitors a hi process, which then exits with {capture, hi_down_reason}",
          fun() ->
                  HD = actor(Hi, []),
                  _ = do(Lo, LA, op_monitor, [HD]), settle(),
                  ok = call(Hi, stop_actor, [HD, {capture, hi_down_reason}])
          end,
          [{out, [28], "payload_monitor_p_exit"}]},
         {monitor_down, "hi monitors a lo process by pid; it exits with {capture, down_reason}",
          fun() ->
                  LD = actor(Lo, []),
                  _ = do(Hi, HB, op_monitor, [LD]), settle(),
                  ok = call(Lo, stop_actor, [LD, {capture, down_reason}])
          end,
          [{out, [19], "monitor_p_by_pid"}, {in, [28], "payload_monitor_p_exit"}]},
         {monitor_down_name, "hi monitors {cap_named, lo}; that process exits with {capture, named_down}",
          fun() ->
                  LN = actor(Lo, [{register, cap_named}]),
                  _ = do(Hi, HB, op_monitor, [{cap_named, LoNode}]), settle(),
                  ok = call(Lo, stop_actor, [LN, {capture, named_down}])
          end,
          [{out, [19], "monitor_p_by_name"}, {in, [28], "payload_monitor_p_exit_by_name"}]},
         {monitor_noproc, "hi monitors {no_such_name, lo}: lo answers noproc",
          fun() -> _ = do(Hi, HB, op_monitor, [{no_such_name, LoNode}]) end,
          [{in, [28, 21], "payload_monitor_p_exit_noproc"}]},
         {spawn4, "lo: spawn(hi, trust_dist_capture, spawned, [spawn_arg])",
          fun() -> _ = do(Lo, LA, op_spawn, [HiNode, ?M, spawned, [spawn_arg]]) end,
          [{in, [29], "spawn_request_spawn4"}, {out, [31], "spawn_reply_spawn4"}]},
         {spawn_link, "lo: spawn_link(hi, trust_dist_capture, spawned, [spawn_link_arg]); the child exits normally",
          fun() -> _ = do(Lo, LA, op_spawn_link, [HiNode, ?M, spawned, [spawn_link_arg]]) end,
          [{in, [29], "spawn_request_spawn_link"}, {out, [31], "spawn_reply_spawn_link"},
           {out, [24], "payload_exit_normal"}]},
         {spawn_monitor, "lo: spawn_monitor(hi, trust_dist_capture, spawned, [spawn_monitor_arg])",
          fun() -> {_, normal} = do(Lo, LA, op_spawn_monitor, [HiNode, ?M, spawned, [spawn_monitor_arg]]) end,
          [{in, [29], "spawn_request_spawn_monitor"}, {out, [31], "spawn_reply_spawn_monitor"},
           {out, [28], "payload_monitor_p_exit_normal"}]},
         {erpc_call, "lo: erpc:call(hi, trust_dist_capture, erpc_echo, [erpc_arg])",
          fun() -> {echo, HiNode, erpc_arg} = do(Lo, LA, op_erpc_call, [HiNode, ?M, erpc_echo, [erpc_arg]]) end,
          [{in, [29], "spawn_request_erpc_call"}, {out, [31], "spawn_reply_erpc_call"},
           {out, [28, 33, 37], "erpc_call_result"}]},
         {erpc_cast, "lo: erpc:cast(hi, trust_dist_capture, erpc_echo, [cast_arg])",
          fun() -> ok = do(Lo, LA, op_erpc_cast, [HiNode, ?M, erpc_echo, [cast_arg]]) end,
          [{in, [29], "spawn_request_erpc_cast"}]},
         {rpc_call, "lo: rpc:call(hi, trust_dist_capture, erpc_echo, [rpc_arg])",
          fun() -> {echo, HiNode, rpc_arg} = do(Lo, LA, op_rpc_call, [HiNode, ?M, erpc_echo, [rpc_arg]]) end,
          [{in, [29], "spawn_request_rpc_call"}, {out, [31], "spawn_reply_rpc_call"},
           {out, [28, 33, 37], "rpc_call_result"}]},
         {spawn_error, "lo: erlang:spawn_request(hi, trust_dist_capture, spawned, [x], [{priority, bogus}])",
          fun() -> _ = do(Lo, LA, op_spawn_request_bad, [HiNode]) end,
          [{in, [29], "spawn_request_bad_option"}, {out, [31], "spawn_reply_error"}]},
         {hi_spawn, "hi: spawn(lo, trust_dist_capture, spawned, [hi_spawn_arg])",
          fun() -> _ = do(Hi, HB, op_spawn, [LoNode, ?M, spawned, [hi_spawn_arg]]) end,
          [{out, [29], "spawn_request_spawn4"}, {in, [31], "spawn_reply"}]},
         {hi_erpc_call, "hi: erpc:call(lo, trust_dist_capture, erpc_echo, [hi_erpc_arg])",
          fun() -> {echo, LoNode, hi_erpc_arg} = do(Hi, HB, op_erpc_call, [LoNode, ?M, erpc_echo, [hi_erpc_arg]]) end,
          [{out, [29], "spawn_request_erpc_call"}, {in, [31], "spawn_reply_erpc_call"},
           {in, [28, 33, 37], "erpc_call_result"}]},
         {gen_call, "lo: gen_server:call(HiPid, from_lo)",
          fun() -> {pong, from_lo} = do(Lo, LA, op_gen_call, [HT, from_lo]) end,
          [{in, [19], "monitor_p_gen_call"}, {in, [22], "send_sender_gen_call"},
           {in, [20], "demonitor_p_gen_call"}, {out, [33, 37], "gen_call_reply"}]},
         {gen_call_name, "lo: gen_server:call({cap_target, hi}, from_lo_by_name)",
          fun() -> {pong, from_lo_by_name} = do(Lo, LA, op_gen_call, [{cap_target, HiNode}, from_lo_by_name]) end,
          [{in, [6], "reg_send_gen_call"}, {out, [33, 37], "gen_call_reply_by_name"}]},
         {hi_gen_call, "hi: gen_server:call(LoPid, from_hi); lo's reply goes to hi's alias",
          fun() -> {pong, from_hi} = do(Hi, HB, op_gen_call, [LT, from_hi]) end,
          [{out, [22], "send_sender_gen_call"}, {in, [33, 37], "gen_call_reply"}]},
         {alias_send, "hi: A = alias(); lo: A ! Msg",
          fun() ->
                  A = do(Hi, HB, op_alias, []),
                  ok = do(Lo, LA, op_send, [A, {hello, alias}]),
                  true = do(Hi, HB, op_unalias, [A])
          end,
          [{in, [33, 37], "alias_send"}]},
         {hi_alias_send, "lo: A = alias(); hi: A ! Msg",
          fun() ->
                  A = do(Lo, LA, op_alias, []),
                  ok = do(Hi, HB, op_send, [A, {hello, alias_from_hi}]),
                  true = do(Lo, LA, op_unalias, [A])
          end,
          [{out, [33, 37], "alias_send"}]},
         %% Sequential trace: the sender carries a token with label 17.
         {send_tt, "lo, token label 17: HiPid ! Msg",
          fun() -> ok = do_tt(Lo, LA, op_send, [HT, {tt, send}]) end,
          [{in, [23], "send_sender_tt"}]},
         {reg_send_tt, "lo, token label 17: {cap_target, hi} ! Msg",
          fun() -> ok = do_tt(Lo, LA, op_reg_send, [cap_target, HiNode, {tt, reg_send}]) end,
          [{in, [16], "reg_send_tt"}]},
         {exit2_tt, "lo, token label 17: exit(HiPid, {capture, exit2_tt})",
          fun() -> true = do_tt(Lo, LA, op_exit, [HS, {capture, exit2_tt}]) end,
          [{in, [27, 18], "payload_exit2_tt"}]},
         {exit_tt, "lo: a process linked to a hi process exits with {capture, exit_tt} while holding a token",
          fun() ->
                  LC = actor(Lo, []),
                  true = do(Lo, LC, op_link, [HS]),
                  ok = call(Lo, stop_actor, [LC, {tt, {capture, exit_tt}}])
          end,
          [{in, [25, 13], "payload_exit_tt"}]},
         {spawn_tt, "lo, token label 17: spawn(hi, trust_dist_capture, spawned, [tt])",
          fun() -> _ = do_tt(Lo, LA, op_spawn, [HiNode, ?M, spawned, [tt]]) end,
          [{in, [30], "spawn_request_tt"}, {out, [32, 31], "spawn_reply_to_tt_request"}]},
         {hi_spawn_tt, "hi, token label 17: spawn(lo, trust_dist_capture, spawned, [hi_tt])",
          fun() -> _ = do_tt(Hi, HB, op_spawn, [LoNode, ?M, spawned, [hi_tt]]) end,
          [{out, [30], "spawn_request_tt"}, {in, [32, 31], "spawn_reply_to_tt_request"}]},
         {alias_send_tt, "hi: A = alias(); lo, token label 17: A ! Msg",
          fun() ->
                  A = do(Hi, HB, op_alias, []),
                  ok = do_tt(Lo, LA, op_send, [A, {tt, alias}]),
                  true = do(Hi, HB, op_unalias, [A])
          end,
          [{in, [34, 37], "alias_send_tt"}]},
         {hi_gen_call_tt, "hi, token label 17: gen_server:call(LoPid, tt_call); lo's reply carries the token",
          fun() -> {pong, tt_call} = do_tt(Hi, HB, op_gen_call, [LT, tt_call]) end,
          [{out, [23], "send_sender_tt_gen_call"}, {in, [34, 37], "gen_call_reply_tt"}]}
        ]
        ++ [{list_to_atom("term_" ++ atom_to_list(K)),
             "lo: HiPid ! {" ++ atom_to_list(K) ++ ", Term} (Term built on lo)",
             fun() -> ok = do(Lo, LA, op_send_term, [HT, K, HiThings]) end,
             [{in, [22], "send_sender_" ++ atom_to_list(K)}]}
            || K <- [local_fun, export_fun, big_binary, map, big_integer, floats,
                     unicode_atom, hi_things, own_things, misc]]
        ++ [{list_to_atom("hi_term_" ++ atom_to_list(K)),
             "hi: LoPid ! {" ++ atom_to_list(K) ++ ", Term} (Term built on hi)",
             fun() -> ok = do(Hi, HB, op_send_term, [LT, K, HiThings]) end,
             [{out, [22], "send_sender_" ++ atom_to_list(K)}]}
            || K <- [local_fun, export_fun, map, own_things]]
        ++ case Altact of
               false -> [];
               true -> altact_steps(Hi, Lo, HB, HT, LA, HiNode, LoNode)
           end,
    _ = take(Hi),   % anything before the first step
    Results = [run_step(Hi, Step) || Step <- Steps],
    SetNode = call(Hi, setnode_info, []),
    write_out(Release, OutDir, HiInfo, LoInfo, SetNode, Results).

%% OTP 28+: the alternative-action signal (op 37): priority messages and exits, and
%% whatever else the VM sends that way.
altact_steps(Hi, Lo, HB, HT, LA, HiNode, _LoNode) ->
    PrioAlias = fun() -> do(Hi, HB, op_alias, [[priority]]) end,
    [{prio_alias_send, "hi: A = alias([priority]); lo: erlang:send(A, Msg, [priority])",
      fun() -> A = PrioAlias(), ok = do(Lo, LA, op_send_opts, [A, {prio, alias}, [priority]]) end,
      [{in, [37, 33], "altact_sig_send_prio_alias"}]},
     {prio_alias_send_tt, "hi: A = alias([priority]); lo, token label 17: erlang:send(A, Msg, [priority])",
      fun() -> A = PrioAlias(), ok = do_tt(Lo, LA, op_send_opts, [A, {prio, alias_tt}, [priority]]) end,
      [{in, [37, 34], "altact_sig_send_prio_alias_tt"}]},
     {prio_alias_nonprio_send, "hi: A = alias([priority]); lo: A ! Msg (no priority option)",
      fun() -> A = PrioAlias(), ok = do(Lo, LA, op_send, [A, {prio, plain_send}]) end,
      [{in, [37, 33], "altact_sig_send_to_prio_alias_without_prio"}]},
     {prio_exit_alias, "hi: A = alias([priority]); lo: erlang:exit(A, {capture, prio_exit}, [priority])",
      fun() -> A = PrioAlias(), do(Lo, LA, op_exit_opts, [A, {capture, prio_exit}, [priority]]) end,
      [{in, [37, 26], "altact_sig_send_prio_exit_alias"}]},
     {prio_exit_alias_tt, "hi: A = alias([priority]); lo, token label 17: erlang:exit(A, {capture, prio_exit_tt}, [priority])",
      fun() -> A = PrioAlias(), do_tt(Lo, LA, op_exit_opts, [A, {capture, prio_exit_tt}, [priority]]) end,
      [{in, [37, 27], "altact_sig_send_prio_exit_alias_token_set"}]},
     {prio_exit_pid, "lo: erlang:exit(HiPid, {capture, prio_exit_pid}, [priority])",
      fun() -> do(Lo, LA, op_exit_opts, [HT, {capture, prio_exit_pid}, [priority]]) end,
      [{in, [37, 26], "altact_sig_send_prio_exit_pid"}]},
     {exit_alias, "hi: A = alias(); lo: erlang:exit(A, {capture, exit_alias}) (no priority)",
      fun() -> A = do(Hi, HB, op_alias, []), do(Lo, LA, op_exit, [A, {capture, exit_alias}]) end,
      [{in, [37, 26], "altact_sig_send_exit_alias"}]},
     {prio_send_pid, "lo: erlang:send(HiPid, Msg, [priority])",
      fun() -> do(Lo, LA, op_send_opts, [HT, {prio, pid}, [priority]]) end,
      [{in, [37, 22], "altact_sig_send_prio_pid"}]},
     {prio_send_name, "lo: erlang:send({cap_target, hi}, Msg, [priority])",
      fun() -> do(Lo, LA, op_send_opts, [{cap_target, HiNode}, {prio, name}, [priority]]) end,
      [{in, [37, 6], "altact_sig_send_prio_name"}]},
     {prio_link, "hi: link(LoPid, [priority]); the lo process exits with {capture, prio_link}",
      fun() ->
              LX = actor(Lo, []),
              do(Hi, HB, op_link_opts, [LX, [priority]]), settle(),
              ok = call(Lo, stop_actor, [LX, {capture, prio_link}])
      end,
      [{out, [1], "link_prio"}, {in, [37, 24], "exit_to_prio_link"}]},
     {prio_monitor, "hi: erlang:monitor(process, LoPid, [priority]); the lo process exits with {capture, prio_down}",
      fun() ->
              LY = actor(Lo, []),
              do(Hi, HB, op_monitor_opts, [process, LY, [priority]]), settle(),
              ok = call(Lo, stop_actor, [LY, {capture, prio_down}])
      end,
      [{out, [19], "monitor_p_prio"}, {in, [37, 28], "down_to_prio_monitor"}]},
     {hi_prio_alias_send, "lo: A = alias([priority]); hi: erlang:send(A, Msg, [priority])",
      fun() ->
              A = do(Lo, LA, op_alias, [[priority]]),
              ok = do(Hi, HB, op_send_opts, [A, {prio, from_hi}, [priority]])
      end,
      [{out, [37, 33], "altact_sig_send_prio_alias"}]},
     {hi_prio_send_pid, "hi: erlang:send(LoPid, Msg, [priority])",
      fun() -> do(Hi, HB, op_send_opts, [LA, {prio, from_hi_pid}, [priority]]) end,
      [{out, [37, 22], "altact_sig_send_prio_pid"}]},
     {unused_ht, "(nothing sent; keeps HT referenced)", fun() -> HT end, []}].

take(Hi) -> call(Hi, take, [?QUIET]).

%% Lets a link or monitor signal cross the link before the control channel (which is not
%% ordered with it) makes the other end exit.
settle() -> timer:sleep(300).

run_step(Hi, {Name, How, Fun, Picks}) ->
    Result = try Fun() of R -> {ok, R} catch C:E -> {failed, C, E} end,
    {Packets, Ticks} = take(Hi),
    io:format("~-26s ~3b packets~s~n",
              [Name, length(Packets),
               case Result of {ok, _} -> ""; _ -> io_lib:format("  (~tp)", [Result]) end]),
    #{name => Name, how => How, result => Result, packets => Packets, picks => Picks,
      ticks => Ticks}.

%%% ------------------------------------------------------------------ output

write_out(Release, OutDir, HiInfo, LoInfo, SetNode, Results) ->
    Dir = filename:join(OutDir, "otp" ++ Release),
    _ = os:cmd("rm -rf '" ++ Dir ++ "'"),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    {Entries, _} = lists:foldl(fun(R, {Acc, Used}) -> pick(R, Acc, Used) end, {[], #{}}, Results),
    Vectors = lists:reverse(Entries),
    [ok = file:write_file(filename:join(Dir, File), Bin) || #{file := File, bin := Bin} <- Vectors],
    Ctx = #{release => Release, hi => HiInfo, lo => LoInfo, setnode => SetNode},
    ok = file:write_file(filename:join(Dir, "index.json"), utf8(index_json(Ctx, Vectors))),
    ok = file:write_file(filename:join(Dir, "transcript.txt"), utf8(transcript(Ctx, Results))),
    ok = file:write_file(filename:join(Dir, "table.md"), utf8(table_md(Ctx, Vectors, Results))),
    io:format("~b vectors in ~s~n", [length([V || #{file := _} = V <- Vectors]), Dir]).

utf8(Chars) ->
    case unicode:characters_to_binary(Chars) of
        B when is_binary(B) -> B;
        Err -> error({not_unicode, Err})
    end.

%% For each pick of a step, the first packet of that direction whose op is in the list.
pick(#{name := Step, how := How, packets := Packets, picks := Picks}, Acc, Used) ->
    lists:foldl(
      fun({Dir, Ops, Base}, {A, U}) ->
              case [P || {D, _, #{op := Op}} = P <- Packets, D =:= Dir, lists:member(Op, Ops)] of
                  [] ->
                      {[#{missing => true, step => Step, how => How, dir => Dir, ops => Ops,
                          base => Base} | A], U};
                  [{Dir, Bin, Desc} | _] ->
                      #{op := Op} = Desc,
                      File0 = lists:flatten(
                                [case Dir of out -> "out_"; in -> "" end,
                                 io_lib:format("~2..0b_~s", [Op, Base])]),
                      N = maps:get(File0, U, 0),
                      File = case N of 0 -> File0 ++ ".bin";
                                 _ -> File0 ++ "_" ++ integer_to_list(N + 1) ++ ".bin"
                             end,
                      {[#{file => File, bin => Bin, desc => Desc, step => Step, how => How,
                          dir => Dir} | A],
                       U#{File0 => N + 1}}
              end
      end, {Acc, Used}, Picks).

index_json(#{release := Rel, hi := Hi, lo := Lo, setnode := SetNode}, Vectors) ->
    Flags = flags(SetNode),
    Common = [{"otp_release", Rel}, {"otp_version", maps:get(otp_version, Hi)},
              {"hi_node", atom_to_list(maps:get(node, Hi))},
              {"hi_creation", maps:get(creation, Hi)},
              {"lo_node", atom_to_list(maps:get(node, Lo))},
              {"lo_creation", maps:get(creation, Lo)},
              {"negotiated_flags_hex", Flags}],
    Items = [json_obj(
               [{"file", F}, {"op", maps:get(op, D)},
                {"direction", case Dir of in -> "lo->hi"; out -> "hi->lo" end},
                {"captured_as", case Dir of in -> "dist_ctrl_put_data"; out -> "dist_ctrl_get_data" end},
                {"local_node", atom_to_list(maps:get(node, Hi))},
                {"local_creation", maps:get(creation, Hi)},
                {"peer_node", atom_to_list(maps:get(node, Lo))},
                {"peer_creation", maps:get(creation, Lo)},
                {"header", atom_to_list(maps:get(form, D))},
                {"size", maps:get(size, D)},
                {"step", atom_to_list(S)}, {"how", H},
                {"control", maps:get(control, D)},
                {"payload", case maps:get(payload, D) of none -> null; P -> P end}])
             || #{file := F, desc := D, dir := Dir, step := S, how := H} <- Vectors],
    Missing = [json_obj([{"step", atom_to_list(S)}, {"direction", atom_to_list(Dir)},
                         {"wanted_ops", {ints, Ops}}, {"name", B}])
               || #{missing := true, step := S, dir := Dir, ops := Ops, base := B} <- Vectors],
    ["{\n", [["  ", json_str(K), ": ", json_val(V), ",\n"] || {K, V} <- Common],
     "  \"vectors\": [\n    ", lists:join(",\n    ", Items), "\n  ],\n",
     "  \"not_seen\": [\n    ", lists:join(",\n    ", Missing), "\n  ]\n}\n"].

flags([#{flags := F} | _]) -> "0x" ++ integer_to_list(F, 16);
flags(_) -> null.

json_obj(KVs) ->
    ["{", lists:join(", ", [[json_str(K), ": ", json_val(V)] || {K, V} <- KVs]), "}"].

json_val(null) -> "null";
json_val(V) when is_integer(V) -> integer_to_list(V);
json_val(V) when is_binary(V) -> json_str(V);
json_val({ints, L}) -> ["[", lists:join(", ", [integer_to_list(X) || X <- L]), "]"];
json_val(V) when is_list(V) -> json_str(V).

json_str(S) ->
    [$", [esc(C) || C <- chars(S)], $"].

chars(S) -> unicode:characters_to_list(S).

esc($") -> "\\\"";
esc($\\) -> "\\\\";
esc($\n) -> "\\n";
esc(C) when C < 32 -> io_lib:format("\\u~4.16.0b", [C]);
esc(C) -> C.

transcript(#{release := Rel, hi := Hi, lo := Lo, setnode := SetNode}, Results) ->
    [io_lib:format("Every packet seen on hi during the capture (OTP ~s).~n"
                   "in = lo -> hi (dist_ctrl_put_data), out = hi -> lo (dist_ctrl_get_data).~n"
                   "hi: ~ts creation ~b~nlo: ~ts creation ~b~nsetnode on hi: ~tp~n~n",
                   [Rel, maps:get(node, Hi), maps:get(creation, Hi), maps:get(node, Lo),
                    maps:get(creation, Lo),
                    [{N, "0x" ++ integer_to_list(F, 16), C}
                     || #{node := N, flags := F, creation := C} <- SetNode]]),
     [[io_lib:format("== ~s: ~ts~s~n", [Name, How, case Result of {ok, _} -> ""; _ -> io_lib:format("  RESULT ~tp", [Result]) end]),
       [io_lib:format("  ~-3s ~8b B ~-14s ~ts~ts~n",
                      [Dir, Size, Form, clip(C, 400),
                       case P of none -> ""; _ -> ["\n                                  payload ", clip(P, 400)] end])
        || {Dir, _, #{size := Size, form := Form, control := C, payload := P}} <- Packets],
       case Ticks of 0 -> ""; _ -> io_lib:format("  (~b empty packets)~n", [Ticks]) end]
      || #{name := Name, how := How, result := Result, packets := Packets, ticks := Ticks} <- Results]].

clip(B, N) ->
    S = unicode:characters_to_list(B),
    case length(S) > N of
        true -> [lists:sublist(S, N), "..."];
        false -> S
    end.

table_md(#{release := Rel, hi := Hi, lo := Lo, setnode := SetNode}, Vectors, _Results) ->
    [io_lib:format("### OTP ~s (~s, erts ~s)~n~n"
                   "- hi (local, the capturing node): `~ts`, creation ~b~n"
                   "- lo (peer): `~ts`, creation ~b~n"
                   "- negotiated flags (hi's `erlang:setnode/3`): `~s`~n~n",
                   [Rel, maps:get(otp_version, Hi), maps:get(erts, Hi),
                    maps:get(node, Hi), maps:get(creation, Hi),
                    maps:get(node, Lo), maps:get(creation, Lo), flags(SetNode)]),
     "| file | dir | header | bytes | how produced | control | payload |\n"
     "|---|---|---|--:|---|---|---|\n",
     [io_lib:format("| `~s` | ~ts | ~s | ~b | ~ts | `~ts` | ~ts |~n",
                    [F, case Dir of in -> "lo→hi"; out -> "hi→lo" end,
                     case maps:get(form, D) of pass_through -> "112"; Other -> Other end,
                     maps:get(size, D), md(How), md(clip(maps:get(control, D), 300)),
                     case maps:get(payload, D) of
                         none -> "–";
                         P -> ["`", md(clip(P, 200)), "`"]
                     end])
      || #{file := F, desc := D, dir := Dir, how := How} <- Vectors],
     case [V || #{missing := true} = V <- Vectors] of
         [] -> "";
         Missing ->
             ["\nNot seen in this capture (the VM sent something else, see transcript.txt):\n\n",
              [io_lib:format("- step `~s`: ~s op ~w (`~s`)~n", [S, Dir, Ops, B])
               || #{step := S, dir := Dir, ops := Ops, base := B} <- Missing]]
     end,
     "\n"].

md(S) ->
    [case C of $| -> "\\|"; $\n -> " "; _ -> C end || C <- chars(S)].

%%% ------------------------------------------------------------------ coverage table

%% Markdown: for each op, the files of each release, from the file names alone.
coverage(OutDir) ->
    Dirs = lists:sort(filelib:wildcard("otp*", OutDir)),
    Files = [{D, F} || D <- Dirs, F <- lists:sort(filelib:wildcard("*.bin", filename:join(OutDir, D)))],
    Op = fun(F) ->
                 {Dir, Rest} = case F of "out_" ++ R -> {out, R}; R -> {in, R} end,
                 {list_to_integer(lists:sublist(Rest, 2)), Dir}
         end,
    Ops = lists:usort([element(1, Op(F)) || {_, F} <- Files]),
    ["| op | name | ", lists:join(" | ", Dirs), " |\n|--:|---|", [["---|"] || _ <- Dirs], "\n",
     [io_lib:format("| ~b | ~s | ~s |~n",
                    [N, op_name(N),
                     lists:join(" | ",
                                [case [F || {D1, F} <- Files, D1 =:= D, element(1, Op(F)) =:= N] of
                                     [] -> "-";
                                     Fs -> lists:join(", ", ["`" ++ F ++ "`" || F <- Fs])
                                 end || D <- Dirs])])
      || N <- Ops]].

op_name(N) ->
    Names = #{1 => "LINK", 2 => "SEND", 3 => "EXIT", 4 => "UNLINK", 6 => "REG_SEND",
              7 => "GROUP_LEADER", 8 => "EXIT2", 12 => "SEND_TT", 13 => "EXIT_TT",
              16 => "REG_SEND_TT", 18 => "EXIT2_TT", 19 => "MONITOR_P", 20 => "DEMONITOR_P",
              21 => "MONITOR_P_EXIT", 22 => "SEND_SENDER", 23 => "SEND_SENDER_TT",
              24 => "PAYLOAD_EXIT", 25 => "PAYLOAD_EXIT_TT", 26 => "PAYLOAD_EXIT2",
              27 => "PAYLOAD_EXIT2_TT", 28 => "PAYLOAD_MONITOR_P_EXIT", 29 => "SPAWN_REQUEST",
              30 => "SPAWN_REQUEST_TT", 31 => "SPAWN_REPLY", 32 => "SPAWN_REPLY_TT",
              33 => "ALIAS_SEND", 34 => "ALIAS_SEND_TT", 35 => "UNLINK_ID",
              36 => "UNLINK_ID_ACK", 37 => "ALTACT_SIG_SEND"},
    maps:get(N, Names, "?").
