%% The red-team attacker (test/redteam_test.exs): runs ON the lower-tier attacker node and
%% writes hand-made distribution packets onto its own authenticated link to the victim.
%%
%% Why this path is real: a compromised lower-tier node controls its whole VM, so whatever
%% bytes it likes reach the QUIC stream of its link. Here the bytes go through the
%% attacker's own carrier (`trust_dist_nif:send/2' on the link it holds), which frames
%% each packet and writes it next to what its VM sends. Nothing is added to the victim:
%% the victim runs the ordinary carrier and has no test hook at all, so every packet below
%% meets the same `LinkFilter::decide' a real attacker's would. Compiled only in the test
%% environment (mix.exs erlc_paths), like trust_dist_probe.
%%
%% Restricted links negotiate neither the atom cache nor fragments, so the packets a
%% well-behaved peer would send are in the pass-through form: 112, the control term with
%% its own 131, then the optional payload term with its own 131. The cases also write the
%% forms such a link must never carry (131,68 / 131,69 / 131,70), truncated and invalid
%% external terms, and floods.
%%
%% The table of cases (names, groups, what each may deliver) is test/redteam_test.exs;
%% `attack(Case, Ctx)' runs one case. Ctx (a map built by the test) names the victim and
%% what the test knows of it: pids of its system processes and canaries, an alias of one
%% of its processes, the witness node and a pid there, and the marker path that any code
%% the attacker got to run would write. The attacker "guesses" those identifiers: pids
%% and references of a node are guessable, and the point is that knowing one grants
%% nothing.
-module(trust_dist_attacker).

-export([attack/2, inject/2, sync/2, fresh_atom/0]).

-define(PASS, 112).
-define(VERSION, 131).
%% ALTACT_SIG_SEND flags (OTP 28+).
-define(ALTACT_PRIO, 1).
-define(ALTACT_TOKEN, 2).
-define(ALTACT_ALIAS, 4).
-define(ALTACT_NAME, 8).
-define(ALTACT_EXIT, 16).

%%% Writing on the link

link_to(Node) ->
    case [L || {N, L, _} <- trust_dist_server:links(), N =:= Node] of
        [Link | _] -> {ok, Link};
        [] -> {error, not_connected}
    end.

%% Writes Packets (binaries, each one whole distribution packet) on the link to Node, in
%% batches of at most 64 per call. `busy' means the queue is above its high-water mark
%% (the packets are queued all the same); back off briefly so a flood measures the
%% victim, not this node's memory. Bounded: at most 20 ms per batch.
inject(Node, Packets) ->
    case link_to(Node) of
        {ok, Link} -> inject_batches(Link, Packets, 0);
        Error -> Error
    end.

inject_batches(_Link, [], N) -> {sent, N};
inject_batches(Link, Packets, N) ->
    {Batch, Rest} = split(64, Packets),
    %% The carrier may ask this node to pause the processes of a lane above its mark;
    %% an attacker simply goes on.
    case trust_dist_nif:send(Link, Batch) of
        busy -> timer:sleep(20);
        {busy, _Pause} -> timer:sleep(20);
        _ -> ok
    end,
    inject_batches(Link, Rest, N + length(Batch)).

split(N, L) when length(L) =< N -> {L, []};
split(N, L) -> lists:split(N, L).

%% A genuine REG_SEND of {sync, Tag} to the victim's exposed `results', written right
%% after a case behind a barrier: the victim delivers it only after every packet sent
%% before it, on any lane, so once `results' has it every packet of the case has been
%% judged.
sync(Node, Tag) ->
    case link_to(Node) of
        {ok, Link} ->
            _ = trust_dist_nif:send_barrier(Link, [pkt({6, self(), '', results}, {sync, Tag})]),
            {sent, 1};
        Error -> Error
    end.

%% An atom that exists here and (the test checks) not on the victim.
fresh_atom() ->
    list_to_atom("trust_dist_rt_" ++ os:getpid() ++ "_" ++
                     integer_to_list(erlang:unique_integer([positive]))).

%%% Building packets
%%
%% Terms are ordinary Erlang terms, except that {'$raw', Bytes} stands for an external
%% term body written by hand (a forged pid, a bad tag), so a hand-made element can sit
%% inside an otherwise ordinary control tuple or payload.

pkt(Ctrl) -> <<?PASS, (enc(Ctrl))/binary>>.
pkt(Ctrl, Payload) -> <<?PASS, (enc(Ctrl))/binary, (enc(Payload))/binary>>.

enc(T) -> <<?VERSION, (body(T))/binary>>.

body({'$raw', Bytes}) -> Bytes;
body(T) when is_tuple(T), tuple_size(T) < 256 ->
    Elems = tuple_to_list(T),
    <<104, (length(Elems)), << <<(body(E))/binary>> || E <- Elems >>/binary>>;
body([_ | _] = L) ->
    <<108, (length(L)):32, << <<(body(E))/binary>> || E <- L >>/binary, 106>>;
body(T) ->
    <<?VERSION, B/binary>> = term_to_binary(T, [{minor_version, 2}]),
    B.

atom_body(A) -> body(A).

%% The victim's creation, read from a pid of the victim the test passed in.
creation(Ctx) ->
    #{victim_pid := Pid} = Ctx,
    Bin = term_to_binary(Pid),
    Size = byte_size(Bin),
    <<_:(Size - 4)/binary, Creation:32>> = Bin,
    Creation.

%% A pid, port or reference of the victim made up here (a guess).
vpid(Ctx, Id, Serial) -> vpid(Ctx, Id, Serial, creation(Ctx)).
vpid(#{victim := V}, Id, Serial, Creation) ->
    {'$raw', <<88, (atom_body(V))/binary, Id:32, Serial:32, Creation:32>>}.

vport(#{victim := V} = Ctx, Id) ->
    {'$raw', <<89, (atom_body(V))/binary, Id:32, (creation(Ctx)):32>>}.

vref(#{victim := V} = Ctx, Words) ->
    {'$raw', <<90, (length(Words)):16, (atom_body(V))/binary, (creation(Ctx)):32,
               << <<W:32>> || W <- Words >>/binary>>}.

%% A pid of a node that is not connected anywhere.
third_pid() ->
    {'$raw', <<88, (atom_body('evil@nowhere.invalid'))/binary, 7:32, 0:32, 1:32>>}.

%% This node's own pid with the wrong creation: a process of an earlier incarnation.
stale_self(Me) ->
    <<?VERSION, 88, Rest/binary>> = term_to_binary(Me),
    Size = byte_size(Rest),
    <<Head:(Size - 4)/binary, Creation:32>> = Rest,
    {'$raw', <<88, Head/binary, (Creation bxor 16#5a5a):32>>}.

%% A sequential-trace token (flags send|receive|print, label, serial, from, last count).
token(From) -> {7, 4242, 1, From, 0}.

%% A process of this node used as the sender of hostile signals, so that answers the
%% victim sends back (link exits, monitor exits, spawn replies) land on it and not on
%% the process peer:call runs in.
sacrifice() ->
    spawn(fun() -> process_flag(trap_exit, true), receive stop -> ok after 60000 -> ok end end).

touch_mfa(#{marker := M}) -> {trust_dist_probe, touch, [M]}.
touch_cmd(#{marker := M}) -> "touch " ++ M.

gen_call(Me, Request) -> {'$gen_call', {Me, make_ref()}, Request}.

sys(Ctx, Name) -> maps:get(Name, maps:get(system, Ctx)).

%%% The cases. Each returns {sent, N} once its packets are queued on the link.

attack(Case, Ctx) ->
    Me = sacrifice(),
    Packets = packets(Case, Me, Ctx),
    Result = inject(maps:get(victim, Ctx), Packets),
    %% Answers (noproc link exits, notsup spawn replies) may still be on their way to Me;
    %% it exits on its own after a minute.
    Result.

%% ---- positive controls: these must be delivered, or the suite could not see a hole ----
packets(control_reg_send, Me, #{tag := T}) ->
    [pkt({6, Me, '', results}, {control, T})];
packets(control_reg_send_tt, Me, #{tag := T}) ->
    [pkt({16, Me, '', results, token(Me)}, {control_tt, T})];
packets(control_altact_name, Me, #{tag := T}) ->
    [pkt({37, ?ALTACT_NAME, Me, results}, {control_altact, T})];

%% ---- header forms and framing --------------------------------------------------------
packets(header_atom_cache_new_atom, Me, _Ctx) ->
    %% 131,68 with one new cache entry defining an atom the victim does not have, used
    %% as the REG_SEND's name: the packet must be refused before any atom is made.
    Atom = atom_to_binary(fresh_atom()),
    Ctrl = <<104, 4, 97, 6, (body(Me))/binary, (body(''))/binary, 82, 0>>,
    [<<131, 68, 1, 16#08, 0, (byte_size(Atom)), Atom/binary, Ctrl/binary,
       (body({hello, cache}))/binary>>];
packets(header_atom_cache_empty, Me, _Ctx) ->
    [<<131, 68, 0, (body({6, Me, '', results}))/binary, (body({via, dist_header}))/binary>>];
packets(header_fragment_absurd_count, Me, _Ctx) ->
    %% A first fragment announcing 2^64-1 fragments: a receiver that reassembles would
    %% keep state for a message that never ends.
    [<<131, 69, 1:64, 16#FFFFFFFFFFFFFFFF:64, 0, (body({6, Me, '', results}))/binary,
       (binary:copy(<<0>>, 64))/binary>>];
packets(header_fragment_orphan, _Me, _Ctx) ->
    [<<131, 70, 99:64, 3:64, (binary:copy(<<1>>, 128))/binary>>];
packets(header_fragment_flood, Me, _Ctx) ->
    [<<131, 69, Seq:64, 1000:64, 0, (body({6, Me, '', results}))/binary>>
     || Seq <- lists:seq(1, 500)];
packets(header_unknown_byte, _Me, _Ctx) ->
    [<<255, 1, 2, 3>>];
packets(header_version_only, _Me, _Ctx) ->
    [<<131>>];
packets(header_pass_through_only, _Me, _Ctx) ->
    [<<?PASS>>];
packets(garbage_random, _Me, _Ctx) ->
    [<<?PASS, (crypto:strong_rand_bytes(4096))/binary>>];
packets(truncated_control, Me, _Ctx) ->
    Full = pkt({6, Me, '', results}, {truncated, control}),
    [binary:part(Full, 0, 9)];
packets(truncated_payload, Me, _Ctx) ->
    Full = pkt({6, Me, '', results}, {truncated, payload, <<"0123456789">>}),
    [binary:part(Full, 0, byte_size(Full) - 5)];
packets(trailing_bytes, Me, _Ctx) ->
    [<<(pkt({6, Me, '', results}, {trailing, bytes}))/binary, 0, 0, 0>>];
packets(extra_term, Me, _Ctx) ->
    [<<(pkt({6, Me, '', results}, {extra, term}))/binary, (enc({third, term}))/binary>>];
packets(payload_without_version, Me, _Ctx) ->
    [<<(pkt({6, Me, '', results}))/binary, (body({no, version}))/binary>>];
packets(oversized_packet, Me, _Ctx) ->
    %% 2 MiB to the exposed name; the worker tier's max_message_size is 1 MiB.
    [pkt({6, Me, '', results}, {oversized, binary:copy(<<7>>, 2 * 1024 * 1024)})];
packets(oversized_flood, Me, _Ctx) ->
    Big = pkt({6, Me, '', results}, {oversized, binary:copy(<<7>>, 1024 * 1024 + 1)}),
    lists:duplicate(24, Big);

%% ---- invalid external terms -------------------------------------------------------------
packets(etf_unknown_tag, Me, _Ctx) -> [reg_send_raw(Me, <<200, 1, 2, 3>>)];
packets(etf_compressed, Me, _Ctx) ->
    %% COMPRESSED_EXT announcing 4 GiB: a zip bomb if anything inflated it.
    [reg_send_raw(Me, <<80, 16#FFFFFFFF:32, (zlib:compress(binary:copy(<<0>>, 65536)))/binary>>)];
packets(etf_local_ext, Me, _Ctx) -> [reg_send_raw(Me, <<121, 0:64, 97, 1>>)];
packets(etf_binary_length_past_end, Me, _Ctx) ->
    [reg_send_raw(Me, <<109, 16#FFFFFFFF:32, "abc">>)];
packets(etf_string_length_past_end, Me, _Ctx) ->
    [reg_send_raw(Me, <<107, 16#FFFF:16, "abc">>)];
packets(etf_list_huge_count, Me, _Ctx) ->
    [reg_send_raw(Me, <<108, 16#FFFFFFFF:32, 97, 1, 106>>)];
packets(etf_tuple_huge_arity, Me, _Ctx) ->
    [reg_send_raw(Me, <<105, 16#FFFFFFFF:32, 97, 1>>)];
packets(etf_map_huge_count, Me, _Ctx) ->
    [reg_send_raw(Me, <<116, 16#FFFFFFFF:32, 97, 1, 97, 2>>)];
packets(etf_big_huge_length, Me, _Ctx) ->
    [reg_send_raw(Me, <<111, 16#FFFFFFFF:32, 0, 1, 2, 3>>)];
packets(etf_atom_bad_utf8, Me, _Ctx) ->
    [reg_send_raw(Me, <<119, 3, 16#C3, 16#28, 16#FF>>)];
packets(etf_atom_too_long, Me, _Ctx) ->
    [reg_send_raw(Me, <<118, 300:16, (binary:copy(<<"a">>, 300))/binary>>)];
packets(etf_atom_latin1_new, Me, _Ctx) ->
    Text = <<"trust_dist_rt_", (integer_to_binary(erlang:unique_integer([positive])))/binary,
             16#E9, 16#F8>>,
    [reg_send_raw(Me, <<100, (byte_size(Text)):16, Text/binary>>)];
packets(etf_atom_cache_ref_in_pass_through, Me, _Ctx) ->
    [reg_send_raw(Me, <<82, 0>>)];
packets(etf_bit_binary_bad_bits, Me, _Ctx) ->
    [reg_send_raw(Me, <<77, 2:32, 0, 16#FF, 16#FF>>), reg_send_raw(Me, <<77, 2:32, 9, 16#FF, 16#FF>>)];
packets(etf_float_nan, Me, _Ctx) ->
    [reg_send_raw(Me, <<70, 16#7FF8000000000001:64>>)];
packets(etf_improper_nesting_in_control, Me, _Ctx) ->
    %% The control tuple itself nests 10,000 deep where the sender pid should be.
    Deep = nest_raw(10000, body(Me)),
    [<<?PASS, (enc({6, {'$raw', Deep}, '', results}))/binary, (enc(x))/binary>>];
packets(etf_deep_list_payload, Me, _Ctx) ->
    [reg_send_raw(Me, nest_raw(100000, <<106>>))];
packets(etf_deep_tuple_payload, Me, _Ctx) ->
    [reg_send_raw(Me, iolist_to_binary([lists:duplicate(50000, <<104, 1>>), <<97, 0>>]))];
packets(etf_deep_map_payload, Me, _Ctx) ->
    [reg_send_raw(Me, iolist_to_binary([lists:duplicate(50000, <<116, 1:32, 97, 1>>), <<106>>]))];
packets(etf_deep_exit_reason, Me, Ctx) ->
    [<<?PASS, (enc({3, Me, maps:get(victim_pid, Ctx), {'$raw', nest_raw(100000, <<106>>)}}))/binary>>];
packets(etf_control_not_tuple, _Me, _Ctx) -> [pkt(hello)];
packets(etf_control_empty_tuple, _Me, _Ctx) -> [pkt({})];
packets(etf_control_op_not_integer, Me, _Ctx) -> [pkt({reg_send, Me, '', results}, x)];
packets(etf_control_op_bignum, Me, _Ctx) -> [pkt({1 bsl 70, Me, '', results}, x)];
packets(etf_control_wrong_arity, Me, _Ctx) -> [pkt({6, Me}, x), pkt({22, Me, Me, Me}, x)];

%% ---- new atoms and funs ---------------------------------------------------------------
packets(atom_new_in_payload, Me, _Ctx) ->
    [pkt({6, Me, '', results}, {new_atom, fresh_atom()})];
packets(atom_new_as_name, Me, _Ctx) ->
    [pkt({6, Me, '', fresh_atom()}, hello)];
packets(atom_new_in_control, Me, _Ctx) ->
    [pkt({6, Me, fresh_atom(), results}, hello)];
packets(atom_new_as_monitor_name, Me, _Ctx) ->
    [pkt({19, Me, fresh_atom(), make_ref()})];
packets(atom_new_as_exit_reason, Me, Ctx) ->
    [pkt({8, Me, maps:get(victim_pid, Ctx), fresh_atom()})];
packets(atom_new_as_node_of_pid, Me, _Ctx) ->
    Node = atom_to_binary(fresh_atom()),
    Pid = <<88, 119, (byte_size(Node)), Node/binary, 1:32, 0:32, 1:32>>,
    [pkt({6, Me, '', results}, {pid, {'$raw', Pid}})];
packets(atom_flood, Me, _Ctx) ->
    [pkt({6, Me, '', results}, {atoms, [fresh_atom() || _ <- lists:seq(1, 100)]})
     || _ <- lists:seq(1, 50)];
packets(fun_export_os_cmd, Me, Ctx) ->
    [pkt({6, Me, '', results}, {apply, fun os:cmd/1, touch_cmd(Ctx)})];
packets(fun_local, Me, Ctx) ->
    Marker = maps:get(marker, Ctx),
    [pkt({6, Me, '', results}, {run, fun() -> trust_dist_probe:touch(Marker) end})];

%% ---- forged identities in payloads ------------------------------------------------------
packets(payload_victim_pid, Me, Ctx) ->
    [pkt({6, Me, '', results}, {reply_to, maps:get(victim_pid, Ctx)})];
packets(payload_guessed_init_pid, Me, Ctx) ->
    [pkt({6, Me, '', results}, {reply_to, vpid(Ctx, 0, 0)})];
packets(payload_victim_port, Me, Ctx) ->
    [pkt({6, Me, '', results}, {port, vport(Ctx, 1)})];
packets(payload_victim_ref, Me, Ctx) ->
    [pkt({6, Me, '', results}, {ref, vref(Ctx, [1, 2, 3])})];
packets(payload_victim_alias, Me, Ctx) ->
    [pkt({6, Me, '', results}, {alias, maps:get(alias, Ctx)})];
packets(payload_third_node_pid, Me, _Ctx) ->
    [pkt({6, Me, '', results}, {reply_to, third_pid()})];
packets(payload_witness_pid, Me, Ctx) ->
    [pkt({6, Me, '', results}, {reply_to, maps:get(witness_pid, Ctx)})];

%% ---- spoofed senders ---------------------------------------------------------------------
packets(spoof_sender_witness, _Me, Ctx) ->
    [pkt({6, maps:get(witness_pid, Ctx), '', results}, {spoofed, witness})];
packets(spoof_sender_victim_own, _Me, Ctx) ->
    [pkt({6, maps:get(victim_pid, Ctx), '', results}, {spoofed, victim})];
packets(spoof_sender_victim_init, _Me, Ctx) ->
    [pkt({6, vpid(Ctx, 0, 0), '', results}, {spoofed, init})];
packets(spoof_sender_third_node, _Me, _Ctx) ->
    [pkt({6, third_pid(), '', results}, {spoofed, third})];
packets(spoof_sender_stale_creation, Me, _Ctx) ->
    [pkt({6, stale_self(Me), '', results}, {spoofed, stale})];
packets(spoof_monitor_exit_from_victim, _Me, Ctx) ->
    V = maps:get(victim_pid, Ctx),
    [pkt({21, maps:get(results, Ctx), V, vref(Ctx, [5, 6, 7]), killed})];
packets(spoof_link_from_witness, _Me, Ctx) ->
    [pkt({1, maps:get(witness_pid, Ctx), maps:get(victim_pid, Ctx)})];

%% ---- every control operation with hostile arguments -------------------------------------
packets(op01_link_init, Me, Ctx) -> [pkt({1, Me, sys(Ctx, init)})];
packets(op01_link_guessed_init, Me, Ctx) -> [pkt({1, Me, vpid(Ctx, 0, 0)})];
packets(op01_link_victim, Me, Ctx) -> [pkt({1, Me, maps:get(victim_pid, Ctx)})];
packets(op02_send_init_stop, _Me, Ctx) -> [pkt({2, '', vpid(Ctx, 0, 0)}, {stop, stop})];
packets(op02_send_victim, _Me, Ctx) -> [pkt({2, '', maps:get(victim_pid, Ctx)}, {guessed, send})];
packets(op03_exit_victim_kill, Me, Ctx) -> [pkt({3, Me, maps:get(victim_pid, Ctx), kill})];
packets(op03_exit_results_parent, Me, Ctx) ->
    [pkt({3, Me, maps:get(results_parent, Ctx), shutdown})];
packets(op04_unlink_old, Me, Ctx) -> [pkt({4, Me, maps:get(victim_pid, Ctx)})];
packets(op05_node_link, _Me, _Ctx) -> [pkt({5})];
packets(op06_reg_send_init_stop, Me, _Ctx) -> [pkt({6, Me, '', init}, {stop, stop})];
packets(op06_reg_send_unlisted, Me, _Ctx) -> [pkt({6, Me, '', victim}, {by_name, unlisted})];
packets(op07_group_leader_victim, Me, Ctx) -> [pkt({7, Me, maps:get(victim_pid, Ctx)})];
packets(op07_group_leader_results, Me, Ctx) -> [pkt({7, Me, maps:get(results, Ctx)})];
packets(op08_exit2_victim_kill, Me, Ctx) -> [pkt({8, Me, maps:get(victim_pid, Ctx), kill})];
packets(op08_exit2_init_kill, Me, Ctx) -> [pkt({8, Me, vpid(Ctx, 0, 0), kill})];
packets(op08_exit2_results_kill, Me, Ctx) -> [pkt({8, Me, maps:get(results, Ctx), kill})];
packets(op09_unassigned, Me, _Ctx) -> [pkt({9, Me, '', results}, x)];
packets(op10_unassigned, Me, _Ctx) -> [pkt({10, Me})];
packets(op11_unassigned, Me, _Ctx) -> [pkt({11, Me})];
packets(op12_send_tt_victim, Me, Ctx) ->
    [pkt({12, '', maps:get(victim_pid, Ctx), token(Me)}, {guessed, send_tt})];
packets(op13_exit_tt_victim, Me, Ctx) ->
    [pkt({13, Me, maps:get(victim_pid, Ctx), token(Me), kill})];
packets(op14_unassigned, Me, _Ctx) -> [pkt({14, Me})];
packets(op15_unassigned, Me, _Ctx) -> [pkt({15, Me})];
packets(op16_reg_send_tt_init, Me, _Ctx) -> [pkt({16, Me, '', init, token(Me)}, {stop, stop})];
packets(op17_unassigned, Me, _Ctx) -> [pkt({17, Me})];
packets(op18_exit2_tt_victim, Me, Ctx) ->
    [pkt({18, Me, maps:get(victim_pid, Ctx), token(Me), kill})];
packets(op19_monitor_system_names, Me, _Ctx) ->
    [pkt({19, Me, Name, make_ref()})
     || Name <- [init, code_server, application_controller, rex, global_name_server,
                 logger, user, file_server_2, victim]];
packets(op19_monitor_guessed_pid, Me, Ctx) ->
    [pkt({19, Me, maps:get(victim_pid, Ctx), make_ref()}), pkt({19, Me, vpid(Ctx, 0, 0), make_ref()})];
packets(op19_monitor_victim_ref, Me, Ctx) ->
    [pkt({19, Me, results, vref(Ctx, [9, 9, 9])})];
packets(op19_monitor_reused_ref, Me, _Ctx) ->
    Ref = make_ref(),
    [pkt({19, Me, results, Ref}), pkt({19, Me, results, Ref})];
packets(op20_demonitor_unknown, Me, Ctx) ->
    [pkt({20, Me, results, make_ref()}), pkt({20, Me, maps:get(victim_pid, Ctx), vref(Ctx, [1, 1, 1])})];
packets(op21_monitor_p_exit_forged, Me, Ctx) ->
    [pkt({21, Me, maps:get(victim_pid, Ctx), vref(Ctx, [4, 5, 6]), killed})];
packets(op21_monitor_p_exit_by_name, _Me, Ctx) ->
    [pkt({21, results, maps:get(results_parent, Ctx), vref(Ctx, [4, 5, 6]), killed})];
packets(op22_send_sender_victim, Me, Ctx) ->
    [pkt({22, Me, maps:get(victim_pid, Ctx)}, {guessed, send_sender})];
packets(op22_send_sender_init_stop, Me, Ctx) ->
    [pkt({22, Me, vpid(Ctx, 0, 0)}, {stop, stop}), pkt({22, Me, sys(Ctx, init)}, {stop, stop})];
packets(op23_send_sender_tt_victim, Me, Ctx) ->
    [pkt({23, Me, maps:get(victim_pid, Ctx), token(Me)}, {guessed, send_sender_tt})];
packets(op24_payload_exit_victim, Me, Ctx) ->
    [pkt({24, Me, maps:get(victim_pid, Ctx)}, kill)];
packets(op25_payload_exit_tt_victim, Me, Ctx) ->
    [pkt({25, Me, maps:get(victim_pid, Ctx), token(Me)}, kill)];
packets(op26_payload_exit2_victim, Me, Ctx) ->
    [pkt({26, Me, maps:get(victim_pid, Ctx)}, kill)];
packets(op26_payload_exit2_results, Me, Ctx) ->
    [pkt({26, Me, maps:get(results, Ctx)}, kill)];
packets(op26_payload_exit2_init, Me, Ctx) ->
    [pkt({26, Me, vpid(Ctx, 0, 0)}, kill)];
packets(op27_payload_exit2_tt_victim, Me, Ctx) ->
    [pkt({27, Me, maps:get(victim_pid, Ctx), token(Me)}, kill)];
packets(op28_payload_monitor_p_exit_forged, Me, Ctx) ->
    [pkt({28, Me, maps:get(results, Ctx), vref(Ctx, [7, 8, 9])}, killed)];
packets(op29_spawn_request_os_cmd, Me, Ctx) ->
    [pkt({29, make_ref(), Me, Me, {os, cmd, 1}, []}, [touch_cmd(Ctx)])];
packets(op29_spawn_request_erpc, Me, Ctx) ->
    {M, F, A} = touch_mfa(Ctx),
    Ref = make_ref(),
    [pkt({29, Ref, Me, Me, {erpc, execute_call, 4}, [monitor]}, [Ref, M, F, A])];
packets(op29_spawn_request_link_monitor, Me, Ctx) ->
    {M, F, A} = touch_mfa(Ctx),
    [pkt({29, make_ref(), Me, Me, {M, F, length(A)}, [link, monitor]}, A)];
packets(op29_spawn_request_victim_group_leader, Me, Ctx) ->
    %% A group leader of the victim's own (user) for the process: io would go there.
    {M, F, A} = touch_mfa(Ctx),
    [pkt({29, make_ref(), Me, sys(Ctx, user), {M, F, length(A)}, []}, A)];
packets(op29_spawn_request_rpc_legacy, Me, Ctx) ->
    {M, F, A} = touch_mfa(Ctx),
    [pkt({29, make_ref(), Me, Me, {rpc, call, 4}, []}, [M, F, A, 1000])];
packets(op30_spawn_request_tt, Me, Ctx) ->
    [pkt({30, make_ref(), Me, Me, {os, cmd, 1}, [], token(Me)}, [touch_cmd(Ctx)])];
packets(op31_spawn_reply_unknown, Me, Ctx) ->
    [pkt({31, vref(Ctx, [3, 3, 3]), maps:get(victim_pid, Ctx), 3, Me}),
     pkt({31, make_ref(), maps:get(victim_pid, Ctx), 0, Me})];
packets(op32_spawn_reply_tt_unknown, Me, Ctx) ->
    [pkt({32, vref(Ctx, [3, 3, 4]), maps:get(victim_pid, Ctx), 1, Me, token(Me)})];
packets(op33_alias_send_guessed, Me, Ctx) ->
    [pkt({33, Me, vref(Ctx, [1, 2, 3])}, {forged, reply}),
     pkt({33, Me, maps:get(alias, Ctx)}, {forged, reply})];
packets(op34_alias_send_tt_guessed, Me, Ctx) ->
    [pkt({34, Me, maps:get(alias, Ctx), token(Me)}, {forged, reply_tt})];
packets(op35_unlink_id_unknown, Me, Ctx) ->
    [pkt({35, 12345, Me, maps:get(victim_pid, Ctx)})];
packets(op36_unlink_id_ack_unknown, Me, Ctx) ->
    [pkt({36, 12345, Me, maps:get(victim_pid, Ctx)}), pkt({36, 0, Me, sys(Ctx, init)})];
packets(op37_altact_exit_victim, Me, Ctx) ->
    [pkt({37, ?ALTACT_EXIT, Me, maps:get(victim_pid, Ctx)}, kill)];
packets(op37_altact_exit_prio_results, Me, _Ctx) ->
    [pkt({37, ?ALTACT_EXIT bor ?ALTACT_NAME bor ?ALTACT_PRIO, Me, results}, kill)];
packets(op37_altact_name_init_stop, Me, _Ctx) ->
    [pkt({37, ?ALTACT_NAME, Me, init}, {stop, stop})];
packets(op37_altact_alias_guessed, Me, Ctx) ->
    [pkt({37, ?ALTACT_ALIAS, Me, maps:get(alias, Ctx)}, {forged, altact_alias})];
packets(op37_altact_pid_victim, Me, Ctx) ->
    [pkt({37, ?ALTACT_PRIO, Me, maps:get(victim_pid, Ctx)}, {guessed, altact})];
packets(op37_altact_token_init, Me, _Ctx) ->
    [pkt({37, ?ALTACT_NAME bor ?ALTACT_TOKEN, Me, init, token(Me)}, {stop, stop})];
packets(op37_altact_unknown_flags, Me, _Ctx) ->
    [pkt({37, 1 bsl 10, Me, results}, {unknown, flags})];
packets(op37_altact_alias_and_name, Me, Ctx) ->
    [pkt({37, ?ALTACT_ALIAS bor ?ALTACT_NAME, Me, maps:get(alias, Ctx)}, {both, flags})];
packets(op38_and_up_unknown, Me, _Ctx) ->
    [pkt({Op, Me, '', results}, x) || Op <- [38, 39, 64, 127, 255, 256, -1]];

%% ---- THREATS.md classes through the allowlisted name and system names -------------------
packets(system_replace_state_results, Me, Ctx) ->
    [pkt({6, Me, '', results},
         {system, {Me, make_ref()}, {replace_state, fun os:cmd/1}}),
     pkt({6, Me, '', results},
         {system, {Me, make_ref()}, {replace_state, {trust_dist_probe, touch, [maps:get(marker, Ctx)]}}})];
packets(system_suspend_results, Me, _Ctx) ->
    [pkt({6, Me, '', results}, {system, {Me, make_ref()}, suspend})];
packets(system_terminate_results, Me, _Ctx) ->
    [pkt({6, Me, '', results}, {system, {Me, make_ref()}, {terminate, kill}})];
packets(system_messages_to_system_names, Me, _Ctx) ->
    [pkt({6, Me, '', N}, {system, {Me, make_ref()}, suspend})
     || N <- [code_server, application_controller, logger, global_name_server, rex,
              kernel_sup, net_kernel, file_server_2, user, standard_error, inet_db]];
packets(forged_exit_from_parent, Me, Ctx) ->
    [pkt({6, Me, '', results}, {'EXIT', maps:get(results_parent, Ctx), shutdown})];
packets(forged_down_and_nodedown, Me, Ctx) ->
    [pkt({6, Me, '', results}, {'DOWN', make_ref(), process, maps:get(results_parent, Ctx), killed}),
     pkt({6, Me, '', results}, {nodedown, maps:get(witness, Ctx)}),
     pkt({6, Me, '', results}, {spawn_reply, make_ref(), ok, Me})];
packets(io_request_results, Me, _Ctx) ->
    [pkt({6, Me, '', results}, {io_request, Me, make_ref(), {put_chars, unicode, "owned\n"}})];
packets(io_request_user_and_gl, Me, Ctx) ->
    [pkt({6, Me, '', user}, {io_request, Me, make_ref(), {put_chars, unicode, "owned\n"}}),
     pkt({22, Me, sys(Ctx, user)}, {io_request, Me, make_ref(), {get_line, unicode, "> "}})];
packets(supervisor_calls_results, Me, _Ctx) ->
    [pkt({6, Me, '', results}, gen_call(Me, {terminate_child, results})),
     pkt({6, Me, '', results}, gen_call(Me, which_children)),
     pkt({6, Me, '', kernel_sup}, gen_call(Me, {terminate_child, logger_sup}))];
packets(gen_event_admin_events, Me, Ctx) ->
    %% gen_event's own protocol: {From, {Pid, Tag}, Command}, no '$gen_call'.
    Reply = {Me, make_ref()},
    [pkt({6, Me, '', events}, {Me, Reply, {add_handler, {trust_dist_probe, rt}, event_canary}}),
     pkt({6, Me, '', events}, {Me, Reply, {delete_handler, trust_dist_probe, x}}),
     pkt({6, Me, '', events}, {Me, Reply, {swap_handler, trust_dist_probe, x,
                                           {trust_dist_probe, rt2}, event_canary}}),
     pkt({6, Me, '', events}, {Me, Reply, which_handlers}),
     pkt({6, Me, '', events}, {Me, Reply, get_modules}),
     pkt({6, Me, '', events}, {Me, Reply, {add_sup_handler, trust_dist_probe, event_canary,
                                           maps:get(victim_pid, Ctx)}})];
packets(gen_event_stop_events, Me, _Ctx) ->
    [pkt({6, Me, '', events}, {Me, {Me, make_ref()}, stop})];
packets(gen_event_bad_reply_tag, Me, _Ctx) ->
    %% A well-formed call but a reply tag gen:reply cannot use: the manager would crash.
    [pkt({6, Me, '', events}, {Me, not_a_tag, {call, trust_dist_probe, get}}),
     pkt({6, Me, '', events}, {x, y, {sync_notify, boom}})];
packets(gen_call_reply_to_other, Me, Ctx) ->
    %% The reply of results would go to the victim's own process: refused.
    [pkt({6, Me, '', results}, {'$gen_call', {maps:get(victim_pid, Ctx), make_ref()}, get})];
packets(application_controller_stop, Me, _Ctx) ->
    [pkt({6, Me, '', application_controller}, gen_call(Me, {stop_application, runtime_tools})),
     pkt({6, Me, '', application_controller}, gen_call(Me, {set_env, kernel, [{x, y}], []}))];
packets(rex_call_and_cast, Me, Ctx) ->
    {M, F, A} = touch_mfa(Ctx),
    [pkt({6, Me, '', rex}, gen_call(Me, {call, M, F, A, Me})),
     pkt({6, Me, '', rex}, {'$gen_cast', {cast, M, F, A, Me}}),
     pkt({6, Me, '', rex}, {Me, {call, os, cmd, [touch_cmd(Ctx)], Me}}),
     pkt({6, Me, '', rex}, {Me, features_request, extra})];
packets(net_kernel_spawn_and_disconnect, Me, Ctx) ->
    {M, F, A} = touch_mfa(Ctx),
    [pkt({6, Me, '', net_kernel}, gen_call(Me, {spawn, M, F, A, Me})),
     pkt({6, Me, '', net_kernel}, gen_call(Me, {spawn_link, M, F, A, Me})),
     pkt({6, Me, '', net_kernel}, gen_call(Me, {disconnect, maps:get(witness, Ctx)})),
     pkt({6, Me, '', net_kernel}, gen_call(Me, {connect, normal, 'evil@nowhere.invalid'})),
     pkt({6, Me, '', net_kernel}, gen_call(Me, {allow, []})),
     pkt({6, Me, '', net_kernel}, {'$gen_call', {Me, make_ref()}, {is_auth, maps:get(witness, Ctx)}})];
packets(global_hijack_and_funs, Me, Ctx) ->
    Marker = maps:get(marker, Ctx),
    [pkt({6, Me, '', global_name_server},
         gen_call(Me, {registrar, fun(_) -> trust_dist_probe:touch(Marker) end})),
     pkt({6, Me, '', global_name_server},
         gen_call(Me, {registrar, {global, register_name, [rt_hijack, Me]}})),
     pkt({6, Me, '', global_name_server},
         {'$gen_cast', {exchange, node(), [{rt_hijack, Me, {global, random_exit_name}}], [], 1}}),
     pkt({6, Me, '', global_name_server}, {'$gen_cast', {in_sync, node(), true}}),
     pkt({6, Me, '', global_group}, gen_call(Me, {global_groups_changed, []}))];
packets(pg_injection, Me, _Ctx) ->
    [pkt({6, Me, '', pg}, {discover, Me}),
     pkt({6, Me, '', pg}, {join, Me, rt_group, [Me]})];
packets(code_server_load, Me, Ctx) ->
    Dir = filename:dirname(maps:get(marker, Ctx)),
    [pkt({6, Me, '', code_server}, {code_call, Me, {add_path, first, Dir}}),
     pkt({6, Me, '', code_server}, {code_call, Me, {add_path, first, Dir, nocache}}),
     pkt({6, Me, '', code_server}, {code_call, Me, {purge, trust_dist_probe}}),
     pkt({6, Me, '', erl_prim_loader}, {Me, {get_file, "/etc/passwd"}})];
packets(file_server_make_dir, Me, Ctx) ->
    [pkt({6, Me, '', file_server_2}, gen_call(Me, {make_dir, maps:get(marker, Ctx)})),
     pkt({6, Me, '', file_server_2}, gen_call(Me, {write_file, maps:get(marker, Ctx), <<"x">>}))];
packets(logger_reconfigure, Me, _Ctx) ->
    [pkt({6, Me, '', logger}, gen_call(Me, {update_config, primary, #{level => none}})),
     pkt({6, Me, '', logger}, gen_call(Me, {remove_handler, default}))];
packets(auth_set_cookie, Me, Ctx) ->
    [pkt({6, Me, '', auth}, gen_call(Me, {set_cookie, maps:get(victim, Ctx), rt_owned})),
     pkt({6, Me, '', auth}, gen_call(Me, {set_cookie, rt_owned}))];
packets(init_stop_all_ways, Me, Ctx) ->
    [pkt({6, Me, '', init}, {stop, stop}),
     pkt({6, Me, '', init}, {Me, {stop, restart}}),
     pkt({22, Me, vpid(Ctx, 0, 0)}, {stop, stop}),
     pkt({2, '', sys(Ctx, init)}, {stop, halt}),
     pkt({33, Me, vref(Ctx, [0, 0, 0])}, {stop, stop})];
packets(inet_db_and_shell, Me, _Ctx) ->
    [pkt({6, Me, '', inet_db}, gen_call(Me, {add_host, {6, 6, 6, 6}, ["rt.evil"]})),
     pkt({6, Me, '', user_drv}, {Me, {open_shell, x}}),
     pkt({6, Me, '', standard_error}, {io_request, Me, make_ref(), {put_chars, unicode, "x"}})];
packets(disconnect_witness_via_global, Me, Ctx) ->
    [pkt({6, Me, '', global_name_server},
         {'$gen_cast', {disconnect_node, maps:get(witness, Ctx)}}),
     pkt({6, Me, '', net_kernel}, {Me, {disconnect, maps:get(witness, Ctx)}})];

%% ---- floods -----------------------------------------------------------------------------
packets(flood_spawn_requests, Me, Ctx) ->
    Cmd = touch_cmd(Ctx),
    [pkt({29, make_ref(), Me, Me, {os, cmd, 1}, []}, [Cmd]) || _ <- lists:seq(1, 2000)];
packets(flood_monitors, Me, _Ctx) ->
    %% Beyond the worker tier's max_monitors (test policy: 500) on the exposed name.
    [pkt({19, Me, results, make_ref()}) || _ <- lists:seq(1, 1500)];
packets(flood_links, Me, Ctx) ->
    V = maps:get(victim_pid, Ctx),
    [pkt({1, Me, V}) || _ <- lists:seq(1, 2000)];
packets(flood_messages_exposed, Me, #{tag := T}) ->
    Body = binary:copy(<<"m">>, 256),
    [pkt({6, Me, '', drain}, {flood, T, Body}) || _ <- lists:seq(1, 20000)];
packets(flood_denials_log, Me, _Ctx) ->
    %% Denied but not fatal to the link: each one is a log candidate.
    [pkt({6, Me, '', init}, {stop, stop}) || _ <- lists:seq(1, 5000)];
packets(flood_guessed_pids, Me, Ctx) ->
    [pkt({22, Me, vpid(Ctx, Id, 0)}, {guess, Id}) || Id <- lists:seq(0, 3000)];
packets(flood_guessed_aliases, Me, Ctx) ->
    [pkt({33, Me, vref(Ctx, [N, N, N])}, {guess, N}) || N <- lists:seq(1, 3000)].

reg_send_raw(Me, PayloadBody) ->
    <<(pkt({6, Me, '', results}))/binary, ?VERSION, PayloadBody/binary>>.

%% Depth lists [[[...Leaf]]] as raw bytes (LIST_EXT of one element each, then nil tails).
nest_raw(0, Leaf) -> Leaf;
nest_raw(N, Leaf) ->
    iolist_to_binary([lists:duplicate(N, <<108, 1:32>>), Leaf, lists:duplicate(N, <<106>>)]).
