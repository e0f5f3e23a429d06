%% Node-side half of the test-vector capture (scripts/capture-vectors.sh,
%% test/capture/capture_vectors.escript). It runs on both nodes of the capture:
%%
%%   * on `hi' (the higher tier; its link to `lo' is restricted) a tracer records every
%%     packet the input handler hands to erlang:dist_ctrl_put_data/2 (incoming, lo -> hi)
%%     and every packet erlang:dist_ctrl_get_data/1 returns to the controller (outgoing,
%%     hi -> lo), with monotonic timestamps;
%%   * on both nodes "actors": long-lived processes that run one operation at a time in
%%     their own context (so links, monitors, seq_trace tokens and exits belong to a
%%     process the script controls), and a registered target `cap_target' that traps
%%     exits, answers gen_server calls and swallows everything else.
%%
%% Everything is driven from the escript through peer:call over standard_io, so the
%% control traffic never crosses the distribution link under capture.
-module(trust_dist_capture).

-export([start_tracer/0, take/1, setnode_info/0, term/2, op_send_term/3, decode/1, describe/1, info/0, local_things/0]).
-export([start_target/0, new_actor/1, do/4, do_tt/4, stop_actor/2, kill_actor/1]).
-export([spawned/1, spawned_linger/1, erpc_echo/1]).
%% operations run inside an actor (see do/4)
-export([op_ping/1, op_send/2, op_reg_send/3, op_link/1, op_unlink/1, op_group_leader/2,
         op_monitor/1, op_demonitor/1, op_exit/2, op_exit_self/1, op_spawn/4,
         op_spawn_link/4, op_spawn_monitor/4, op_erpc_call/4, op_erpc_cast/4,
         op_rpc_call/4, op_gen_call/2, op_alias/0, op_alias/1, op_send_opts/3,
         op_exit_opts/3, op_link_opts/2, op_monitor_opts/3, op_register/1, op_await/1,
         op_unalias/1, op_spawn_request_bad/1]).

-define(TRACER, cap_tracer).

%%% ------------------------------------------------------------------ tracer (hi)

start_tracer() ->
    Parent = self(),
    Pid = spawn(fun() ->
                        register(?TRACER, self()),
                        Parent ! {?TRACER, ready},
                        tracer_loop(#{acc => [], ticks => 0, setnode => []})
                end),
    receive {?TRACER, ready} -> ok end,
    1 = erlang:trace_pattern({erlang, dist_ctrl_put_data, 2}, true, [global]),
    1 = erlang:trace_pattern({erlang, dist_ctrl_get_data, 1},
                             [{'_', [], [{return_trace}]}], [global]),
    %% setnode/3 carries the negotiated flags and the peer's creation.
    1 = erlang:trace_pattern({erlang, setnode, 3}, true, [global]),
    _ = erlang:trace(all, true, [call, monotonic_timestamp, {tracer, Pid}]),
    ok.

tracer_loop(State) ->
    receive
        {take, From, Ref, QuietMs} ->
            #{acc := Acc, ticks := Ticks} = State1 = settle(State, QuietMs),
            Sorted = lists:keysort(2, lists:reverse(Acc)),
            From ! {Ref, [{Dir, Bin} || {Dir, _, Bin} <- Sorted], Ticks},
            tracer_loop(State1#{acc := [], ticks := 0});
        {setnode, From, Ref} ->
            From ! {Ref, maps:get(setnode, State)},
            tracer_loop(State);
        Msg ->
            tracer_loop(handle_trace(Msg, State))
    end.

%% Keeps recording until no trace message has arrived for QuietMs.
settle(State, QuietMs) ->
    receive
        Msg when element(1, Msg) =:= trace_ts -> settle(handle_trace(Msg, State), QuietMs)
    after QuietMs ->
            State
    end.

handle_trace({trace_ts, _Pid, call, {erlang, dist_ctrl_put_data, [_DH, Data]}, TS},
             #{acc := Acc, ticks := Ticks} = State) ->
    case iolist_to_binary(Data) of
        <<>> -> State#{ticks := Ticks + 1};
        Bin -> State#{acc := [{in, TS, binary:copy(Bin)} | Acc]}
    end;
handle_trace({trace_ts, _Pid, return_from, {erlang, dist_ctrl_get_data, 1}, Ret, TS},
             #{acc := Acc} = State) ->
    case Ret of
        none -> State;
        {_Size, IoVec} -> State#{acc := [{out, TS, iolist_to_binary(IoVec)} | Acc]};
        IoVec -> State#{acc := [{out, TS, iolist_to_binary(IoVec)} | Acc]}
    end;
handle_trace({trace_ts, _Pid, call, {erlang, setnode, [Node, _Ctrl, {Flags, Creation}]}, _},
             #{setnode := L} = State) ->
    State#{setnode := [#{node => Node, flags => Flags, creation => Creation} | L]};
handle_trace(_, State) ->
    State.

%% [#{node, flags, creation}] of every connection set up since the tracer started.
setnode_info() ->
    Ref = make_ref(),
    ?TRACER ! {setnode, self(), Ref},
    receive {Ref, L} -> L after 5000 -> error(tracer_timeout) end.

%% All packets recorded since the last take, oldest first, once the link has been quiet
%% for QuietMs; each is {in | out, Binary, Description}.
take(QuietMs) ->
    Ref = make_ref(),
    ?TRACER ! {take, self(), Ref, QuietMs},
    receive
        {Ref, Packets, Ticks} ->
            {[{Dir, Bin, describe(Bin)} || {Dir, Bin} <- Packets], Ticks}
    after 60000 ->
            error(tracer_timeout)
    end.

%%% ------------------------------------------------------------------ decoding

%% {HeaderForm, Control, Payload} with Payload = none | {payload, Term}.
decode(<<112, Rest/binary>>) ->
    {Ctrl, Used} = binary_to_term(Rest, [used]),
    <<_:Used/binary, P/binary>> = Rest,
    {pass_through, Ctrl, payload(P)};
decode(<<131, 68, 0, Rest/binary>>) ->
    %% Normal header without atom-cache refs: the terms lack their 131 version byte.
    {Ctrl, Used} = binary_to_term(<<131, Rest/binary>>, [used]),
    <<_:(Used - 1)/binary, P/binary>> = Rest,
    {normal_header_no_refs, Ctrl,
     case P of <<>> -> none; _ -> {payload, binary_to_term(<<131, P/binary>>)} end};
decode(<<131, Form, _/binary>>) ->
    {{unsupported_header, Form}, undefined, none}.

payload(<<>>) -> none;
payload(P) -> {payload, binary_to_term(P)}.

%% A printable summary: header form, op, control and payload as text (deep terms and
%% long binaries abbreviated), the payload's size in bytes.
describe(Bin) ->
    try decode(Bin) of
        {Form, Ctrl, Payload} ->
            Op = case Ctrl of
                     T when is_tuple(T), tuple_size(T) > 0 -> element(1, T);
                     _ -> undefined
                 end,
            #{form => Form, op => Op, size => byte_size(Bin),
              control => text(Ctrl),
              payload => case Payload of none -> none; {payload, P} -> text(P) end}
    catch
        C:R -> #{form => error, op => undefined, size => byte_size(Bin),
                 control => text({C, R}), payload => none}
    end.

text(Term) ->
    unicode:characters_to_binary(io_lib:format("~0tP", [Term, 40])).

%%% ------------------------------------------------------------------ node facts

info() ->
    #{node => node(), creation => erlang:system_info(creation),
      otp_release => erlang:system_info(otp_release),
      otp_version => otp_version(),
      erts => erlang:system_info(version)}.

otp_version() ->
    File = filename:join([code:root_dir(), "releases", erlang:system_info(otp_release),
                          "OTP_VERSION"]),
    case file:read_file(File) of
        {ok, V} -> string:trim(binary_to_list(V));
        _ -> erlang:system_info(otp_release)
    end.

%% A pid, a reference and a port of this node, to be sent back to it inside payloads.
local_things() ->
    {self(), make_ref(), hd(erlang:ports())}.

%%% ------------------------------------------------------------------ target and actors

%% `cap_target': traps exits, answers gen_server calls with {pong, Request}, swallows the rest.
start_target() ->
    case whereis(cap_target) of
        undefined ->
            Parent = self(),
            Pid = spawn(fun() ->
                                register(cap_target, self()),
                                process_flag(trap_exit, true),
                                Parent ! {cap_target, ready},
                                target_loop()
                        end),
            receive {cap_target, ready} -> Pid end;
        Pid ->
            Pid
    end.

target_loop() ->
    receive
        {'$gen_call', From, Req} ->
            gen_server:reply(From, {pong, Req}),
            target_loop();
        _ ->
            target_loop()
    end.

%% An actor traps exits when asked; it runs ?MODULE:op_*(...) in its own context.
new_actor(Opts) ->
    Parent = self(),
    Pid = spawn(fun() ->
                        process_flag(trap_exit, proplists:get_bool(trap_exit, Opts)),
                        case proplists:get_value(register, Opts) of
                            undefined -> ok;
                            Name -> register(Name, self())
                        end,
                        Parent ! {self(), ready},
                        actor_loop()
                end),
    receive {Pid, ready} -> Pid end.

actor_loop() ->
    receive
        {cap_do, From, Ref, F, Args, Token} ->
            set_token(Token),
            Result = try apply(?MODULE, F, Args)
                     catch C:R -> {caught, C, R}
                     end,
            seq_trace:set_token([]),
            From ! {Ref, Result},
            actor_loop();
        {cap_stop, Reason} ->
            exit(Reason);
        {cap_stop_tt, Reason, Token} ->
            set_token(Token),
            exit(Reason);
        _ ->
            actor_loop()
    end.

set_token(none) -> ok;
set_token(Label) -> seq_trace:set_token(label, Label).

%% Runs op F(Args) inside Actor (optionally with a seq_trace token with that label).
do(Actor, F, Args, Timeout) -> call_actor(Actor, F, Args, none, Timeout).
do_tt(Actor, F, Args, Timeout) -> call_actor(Actor, F, Args, 17, Timeout).

call_actor(Actor, F, Args, Token, Timeout) ->
    Ref = make_ref(),
    Actor ! {cap_do, self(), Ref, F, Args, Token},
    receive {Ref, Result} -> Result
    after Timeout -> {timeout, F}
    end.

%% The actor exits with Reason (with a seq_trace token when Tt is true).
stop_actor(Actor, {tt, Reason}) -> Actor ! {cap_stop_tt, Reason, 17}, ok;
stop_actor(Actor, Reason) -> Actor ! {cap_stop, Reason}, ok.

kill_actor(Actor) -> exit(Actor, kill), ok.

%% Bodies of processes spawned remotely.
spawned(Arg) -> timer:sleep(50), Arg.
spawned_linger(Ms) -> timer:sleep(Ms), ok.
erpc_echo(X) -> {echo, node(), X}.

%%% ------------------------------------------------------------------ operations

op_ping(Node) -> net_adm:ping(Node).
op_send(To, Msg) -> To ! Msg, ok.
op_reg_send(Name, Node, Msg) -> {Name, Node} ! Msg, ok.
op_link(Pid) -> link(Pid).
op_unlink(Pid) -> unlink(Pid).
op_group_leader(Leader, Pid) -> group_leader(Leader, Pid).
op_monitor(Target) -> erlang:monitor(process, Target).
op_demonitor(Ref) -> erlang:demonitor(Ref, [flush]).
op_exit(Pid, Reason) -> exit(Pid, Reason).
op_exit_self(Reason) -> exit(Reason).
op_spawn(Node, M, F, A) -> spawn(Node, M, F, A).
op_spawn_link(Node, M, F, A) -> spawn_link(Node, M, F, A).
op_spawn_monitor(Node, M, F, A) ->
    {Pid, Ref} = spawn_monitor(Node, M, F, A),
    receive {'DOWN', Ref, process, Pid, Reason} -> {Pid, Reason} after 5000 -> timeout end.
op_erpc_call(Node, M, F, A) -> erpc:call(Node, M, F, A, 5000).
op_erpc_cast(Node, M, F, A) -> erpc:cast(Node, M, F, A).
op_rpc_call(Node, M, F, A) -> rpc:call(Node, M, F, A, 5000).
op_gen_call(Dest, Req) -> gen_server:call(Dest, Req, 5000).
op_alias() -> alias().
op_alias(Opts) -> alias(Opts).
op_unalias(Alias) -> unalias(Alias).
op_send_opts(To, Msg, Opts) -> erlang:send(To, Msg, Opts).
op_exit_opts(To, Reason, Opts) -> apply(erlang, exit, [To, Reason, Opts]).
op_link_opts(Pid, Opts) -> apply(erlang, link, [Pid, Opts]).
op_monitor_opts(Type, Target, Opts) -> erlang:monitor(Type, Target, Opts).
op_register(Name) -> register(Name, self()).
%% Waits for a message matching Tag as the first element (or any message, tag '_').
op_await(Tag) ->
    receive
        M when Tag =:= '_'; element(1, M) =:= Tag -> M
    after 3000 -> timeout
    end.

%% Sends {Kind, term(Kind, Extra)}; the term is built here, on the sending node.
op_send_term(To, Kind, Extra) -> To ! {Kind, term(Kind, Extra)}, ok.

term(local_fun, _) ->
    Captured = {captured, node()},
    fun(X) -> {X, Captured} end;
term(export_fun, _) ->
    fun erlang:node/0;
term(big_binary, _) ->
    %% 1 MiB (+1 byte, so that it is strictly over), not all one byte value.
    binary:copy(<<"trust_dist-vector-"/utf8, 0, 255, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12>>,
                (1 bsl 20) div 32 + 1);
term(map, _) ->
    Large = maps:from_list([{K, K * K} || K <- lists:seq(1, 40)]),
    #{a => 1, <<"bin key">> => [1.5, "str"], {tuple, key} => #{nested => true},
      large => Large};
term(big_integer, _) ->
    [1 bsl 64, -(1 bsl 64), 1 bsl 100, -(1 bsl 300) + 7, 255, 256, -1, 16#7FFFFFFF,
     -16#80000000, 16#80000000];
term(floats, _) ->
    [3.14159, -0.0, 0.0, 1.0e300, -2.5e-308, 1.0 / 3.0];
term(unicode_atom, _) ->
    ['ünïcødé_атом_原子', 'plain', '', 'with space', <<"ünïcødé"/utf8>>, "ünïcødé"];
term(hi_things, {Pid, Ref, Port}) ->
    #{pid => Pid, ref => Ref, port => Port};
term(own_things, _) ->
    {Pid, Ref, Port} = local_things(),
    #{pid => Pid, ref => Ref, port => Port, alias => alias()};
term(misc, _) ->
    {<<1:3>>, <<1, 2, 3, 4:4>>, [], [a | b], "a string", {}, {1, 2, 3}, [1, 2, 3],
     lists:duplicate(300, $x), list_to_tuple(lists:seq(1, 300))}.

%% A spawn request with an option the remote side may refuse.
op_spawn_request_bad(Node) ->
    try erlang:spawn_request(Node, ?MODULE, spawned, [x], [{priority, bogus}]) of
        ReqId ->
            receive {spawn_reply, ReqId, Result, What} -> {Result, What}
            after 3000 -> timeout
            end
    catch C:R -> {local_error, C, R}
    end.
