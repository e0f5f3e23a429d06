%% Test-only code that runs on the BEAM nodes of the test suite. Each function is called
%% through peer:call on one node and acts on another node over the carrier under test.
-module(trust_dist_probe).
-behaviour(gen_server).

-export([telemetry_start/0, telemetry_events/0, remote_io_format/3]).
-export([start_echo/1, echo_roundtrip/3, alias_roundtrip/1, send_to_alias/2,
         transfer/3, hash_receiver/0, ordered_senders/3, collector/3,
         start_server/1, server_call/3, link_exit/2, monitor_down/2, monitor_noproc/1,
         spawn_link_remote/1, hello_and_exit/1, remote_exit_after/2, rpc_and_erpc/1, park/0,
         watch_nodes/0, await_nodedown/2, remote_pid/2, pid_status/2, global_pg/1,
         inject_garbage/2, flood/3, sink/0, ping_at/2, capture_logs/0, logs/0, log/2, atom_exists/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).
%% Directional trust (test/trust_test.exs): fixtures on the higher node, what the lower
%% node tries, and what the higher node checks afterwards.
-export([trust_fixtures/0, reports/1, results_seen/0, results_await/2, results_state/0, victim_seen/0,
         whereis_all/1, group_leader_of/1, links_of/1, monitors_from/2, connection_id/1,
         app_running/1, in_code_path/1, touch/1, allowed_fun/1, forbidden_fun/1, try_spawn/2,
         try_erpc/4, try_rpc/4, send_to/2, send_exit/2, link_then_exit/1, set_group_leader/1,
         try_replace_state/1, hijack/1, try_suspend/1, forged_exit/2, init_stop/2,
         rex_attack/3, net_kernel_attack/2, code_server_attack/3, appctl_attack/2,
         global_attack/2, atom_flood/4, big_message/3, monitor_flood/3, release/1,
         inject_reg_send/4, remote_io/2, remote_kill/1, global_register/1, global_lookup/1,
         monitor_alive/2, start_slow/2, slow_last_from/1, forge_reply/2]).
%% The red team (test/redteam_test.exs): the victim's canaries and what the test compares
%% before and after each case. The attacker's side is trust_dist_attacker.
-export([redteam_fixtures/0, redteam_snapshot/2, redteam_settle/4, alias_canary_seen/0, atoms_since/2,
         drain_count/0, handle_event/2, handle_call/2]).

%% A registered process that answers {From, Msg} with {echo, Msg}.
start_echo(Name) ->
    Pid = spawn(fun() -> register(Name, self()), echo_loop() end),
    wait_registered(Name, 50),
    Pid.

wait_registered(Name, 0) -> error({not_registered, Name});
wait_registered(Name, N) ->
    case whereis(Name) of
        undefined -> timer:sleep(10), wait_registered(Name, N - 1);
        _ -> ok
    end.

echo_loop() ->
    receive
        {From, Msg} -> From ! {echo, Msg}, echo_loop();
        stop -> ok
    end.

echo_roundtrip(Dest, Msg, Timeout) ->
    Dest ! {self(), Msg},
    receive {echo, Msg} -> ok after Timeout -> timeout end.

%% The alias is created here; a process on Node sends to it.
alias_roundtrip(Node) ->
    Alias = alias(),
    ok = erpc:call(Node, ?MODULE, send_to_alias, [Alias, {via_alias, Node}]),
    Result = receive {via_alias, Node} -> ok after 5000 -> timeout end,
    unalias(Alias),
    Result.

send_to_alias(Alias, Msg) ->
    Alias ! Msg,
    ok.

%% Sends a Size-byte binary of random content to a hashing receiver on Node; returns
%% whether the SHA-256 computed there equals the one computed here.
transfer(Node, Size, Timeout) ->
    Bin = payload(Size),
    Expected = crypto:hash(sha256, Bin),
    Receiver = erpc:call(Node, erlang, spawn, [?MODULE, hash_receiver, []]),
    Receiver ! {self(), Bin},
    receive
        {hashed, Size, Expected} -> ok;
        {hashed, GotSize, GotHash} -> {mismatch, GotSize, GotHash}
    after Timeout -> timeout
    end.

payload(0) -> <<>>;
payload(Size) ->
    Chunk = crypto:strong_rand_bytes(min(Size, 1024 * 1024)),
    Whole = binary:copy(Chunk, Size div byte_size(Chunk)),
    Rest = Size - byte_size(Whole),
    <<Whole/binary, (binary:part(Chunk, 0, Rest))/binary>>.

hash_receiver() ->
    receive {From, Bin} -> From ! {hashed, byte_size(Bin), crypto:hash(sha256, Bin)} end.

%% Senders processes here each send N numbered messages to one collector on Node, which
%% checks that every sender's messages arrive complete and in order.
ordered_senders(Node, Senders, N) ->
    Collector = erpc:call(Node, erlang, spawn, [?MODULE, collector, [self(), Senders, N]]),
    [spawn_link(fun() -> [Collector ! {I, Seq} || Seq <- lists:seq(1, N)] end)
     || I <- lists:seq(1, Senders)],
    receive {collected, Result} -> Result after 60000 -> timeout end.

collector(Reply, Senders, N) ->
    Next = maps:from_list([{I, 1} || I <- lists:seq(1, Senders)]),
    Reply ! {collected, collect(Next, Senders * N, N)}.

collect(_Next, 0, _N) -> ok;
collect(Next, Left, N) ->
    receive
        {I, Seq} ->
            case maps:get(I, Next) of
                Seq -> collect(Next#{I := Seq + 1}, Left - 1, N);
                Expected -> {out_of_order, I, expected, Expected, got, Seq}
            end
    after 30000 -> {stalled, Next}
    end.

%% A gen_server registered as Name that answers calls with {pong, node(), Request}.
start_server(Name) ->
    {ok, Pid} = gen_server:start({local, Name}, ?MODULE, [], []),
    Pid.

init([]) -> {ok, #{}};
%% `results': records every call and message it gets, in order.
init(results) ->
    process_flag(trap_exit, true),
    {ok, {results, []}};
%% As a gen_event handler of the red team's `events' manager: records every event.
init(event_canary) -> {ok, {event_canary, []}}.

handle_call(get, _From, {results, Seen} = State) ->
    {reply, lists:reverse(Seen), State};
handle_call({record, X}, _From, {results, Seen}) ->
    {reply, {recorded, node(), X}, {results, [{call, X} | Seen]}};
handle_call(Request, _From, State) -> {reply, {pong, node(), Request}, State}.
handle_cast(_Msg, State) -> {noreply, State}.

%% gen_event handler callbacks (the `events' canary).
handle_event(Event, {event_canary, Seen}) -> {ok, {event_canary, [{event, Event} | Seen]}}.
handle_call(get, {event_canary, Seen} = State) -> {ok, lists:reverse(Seen), State};
handle_call(_Query, State) -> {ok, unknown, State}.
handle_info(Msg, {results, Seen}) ->
    %% A sequential-trace token adopted with a message would show here: a lower tier's
    %% token must be stripped before delivery.
    Token = case seq_trace:get_token() of
                [] -> [];
                T -> [{token, T}]
            end,
    {noreply, {results, Token ++ [{info, Msg} | Seen]}};
handle_info(Msg, {event_canary, Seen}) -> {ok, {event_canary, [{info, Msg} | Seen]}};
handle_info(_Msg, State) -> {noreply, State}.

server_call(Name, Node, Request) ->
    gen_server:call({Name, Node}, Request, 5000).

%% Links to a process on Node that then exits with Reason; returns the EXIT received.
link_exit(Node, Reason) ->
    process_flag(trap_exit, true),
    Pid = erpc:call(Node, erlang, spawn, [?MODULE, remote_exit_after, [100, Reason]]),
    link(Pid),
    receive {'EXIT', Pid, Got} -> {exit, Got} after 5000 -> timeout end.

remote_exit_after(Ms, Reason) ->
    timer:sleep(Ms),
    exit(Reason).

monitor_down(Node, Reason) ->
    Pid = erpc:call(Node, erlang, spawn, [?MODULE, remote_exit_after, [100, Reason]]),
    Ref = monitor(process, Pid),
    receive {'DOWN', Ref, process, Pid, Got} -> {down, Got} after 5000 -> timeout end.

%% A monitor on a registered name that does not exist on Node.
monitor_noproc(Node) ->
    Ref = monitor(process, {no_such_name_here, Node}),
    receive {'DOWN', Ref, process, _, Got} -> {down, Got} after 5000 -> timeout end.

%% Node.spawn_link: the remote process sends back its node and exits; the link delivers
%% the exit reason.
spawn_link_remote(Node) ->
    process_flag(trap_exit, true),
    Self = self(),
    %% MFA, not a fun: funs do not travel between nodes running different builds.
    Pid = spawn_link(Node, ?MODULE, hello_and_exit, [Self]),
    R1 = receive {hello_from, N} -> N after 5000 -> timeout end,
    R2 = receive {'EXIT', Pid, Why} -> Why after 5000 -> timeout end,
    {R1, R2}.

hello_and_exit(To) ->
    To ! {hello_from, node()},
    exit(done_remote).

rpc_and_erpc(Node) ->
    {erpc:call(Node, erlang, node, [], 5000),
     rpc:call(Node, erlang, node, [], 5000),
     catch erpc:call(Node, erlang, error, [boom], 5000)}.

%% A process that waits forever; used as a remote pid to check later.
park() ->
    spawn(fun() -> receive stop -> ok end end).

%% Subscribes the caller's node to nodeup/nodedown and keeps them in a registered
%% mailbox process.
watch_nodes() ->
    Pid = spawn(fun() -> ok = net_kernel:monitor_nodes(true, [nodedown_reason]), watch_loop([]) end),
    register(trust_dist_probe_watch, Pid),
    ok.

watch_loop(Events) ->
    receive
        {get, From} -> From ! {events, lists:reverse(Events)}, watch_loop(Events);
        Event -> watch_loop([{erlang:monotonic_time(millisecond), Event} | Events])
    end.

%% Waits up to TimeoutMs until a nodedown for Node is recorded; returns
%% {ok, MonotonicMs, Reason}.
await_nodedown(Node, TimeoutMs) ->
    await_nodedown_until(Node, erlang:monotonic_time(millisecond) + TimeoutMs).

await_nodedown_until(Node, Deadline) ->
    trust_dist_probe_watch ! {get, self()},
    Events = receive {events, E} -> E end,
    case [{T, R} || {T, {nodedown, N, Info}} <- Events, N =:= Node,
                    R <- [proplists:get_value(nodedown_reason, Info)]] of
        [{T, R} | _] -> {ok, T, R};
        [] ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> timeout;
                false -> timer:sleep(50), await_nodedown_until(Node, Deadline)
            end
    end.

remote_pid(Node, Fun) ->
    erpc:call(Node, ?MODULE, Fun, []).

%% What happens when we address Pid (on another node): monitor it and see.
pid_status(Pid, Timeout) ->
    Ref = monitor(process, Pid),
    receive {'DOWN', Ref, process, Pid, Why} -> {down, Why}
    after Timeout -> demonitor(Ref, [flush]), alive
    end.

%% Registers a parked process globally as Name and makes it join a pg group (the node
%% runs with -kernel start_pg true).
global_pg(Name) ->
    Pid = park(),
    yes = global:register_name(Name, Pid),
    ok = pg:join(trust_dist_group, Pid),
    Pid.

%% Writes raw bytes as one distribution packet on the established link to Node,
%% bypassing the VM: what a compromised or buggy peer could send.
inject_garbage(Node, Bytes) ->
    [Link] = [L || {N, L, _} <- trust_dist_server:links(), N =:= Node],
    trust_dist_nif:send(Link, [Bytes]).

%% Collects every logger event of the trust_dist domain on this node, formatted, so a
%% test can assert on the reason a node logged.
capture_logs() ->
    Pid = spawn(fun() -> log_store([]) end),
    register(trust_dist_probe_logs, Pid),
    ok = logger:add_handler(trust_dist_probe, ?MODULE,
                            #{level => all,
                              filter_default => stop,
                              filters => [{td, {fun logger_filters:domain/2,
                                                {log, sub, [trust_dist]}}}]}),
    ok.

log_store(Lines) ->
    receive
        {line, L} -> log_store([L | Lines]);
        {report, R} -> log_store([R | Lines]);
        {get, From} -> From ! {lines, lists:reverse(Lines)}, log_store(Lines)
    end.

logs() ->
    trust_dist_probe_logs ! {get, self()},
    receive {lines, Lines} -> Lines after 5000 -> [] end.

%% logger handler callback
log(#{msg := {report, Report}}, #{id := trust_dist_probe_reports}) ->
    trust_dist_probe_reports ! {report, Report},
    ok;
log(_Event, #{id := trust_dist_probe_reports}) ->
    ok;
log(#{msg := Msg}, _Config) ->
    Text = case Msg of
               {string, S} -> S;
               {report, R} -> io_lib:format("~tp", [R]);
               {Format, Args} -> io_lib:format(Format, Args)
           end,
    trust_dist_probe_logs ! {line, unicode:characters_to_binary(Text)},
    ok.

atom_exists(Chars) ->
    try list_to_existing_atom(Chars) of _ -> true catch error:badarg -> false end.

%% Senders here push 1 MiB messages to a discarding sink on Node for Ms milliseconds.
%% Returns the busy_dist_port events seen, the peak memory of this node and the bytes
%% the sink took.
flood(Node, Ms, Senders) ->
    erlang:system_monitor(self(), [busy_dist_port]),
    Sink = erpc:call(Node, erlang, spawn, [?MODULE, sink, []]),
    Bin = crypto:strong_rand_bytes(1024 * 1024),
    Stop = erlang:monotonic_time(millisecond) + Ms,
    Pids = [spawn_link(fun() -> flood_loop(Sink, Bin, Stop) end) || _ <- lists:seq(1, Senders)],
    {Busy, Peak} = flood_watch(Pids, 0, erlang:memory(total)),
    erlang:system_monitor(undefined),
    Sink ! {self(), total},
    Total = receive {sink_total, T} -> T after 30000 -> timeout end,
    #{busy_events => Busy, peak_memory => Peak, received => Total}.

flood_loop(Sink, Bin, Stop) ->
    case erlang:monotonic_time(millisecond) < Stop of
        true -> Sink ! Bin, flood_loop(Sink, Bin, Stop);
        false -> ok
    end.

flood_watch([], Busy, Peak) -> {Busy, Peak};
flood_watch(Pids, Busy, Peak) ->
    Peak1 = max(Peak, erlang:memory(total)),
    receive
        {monitor, _, busy_dist_port, _} -> flood_watch(Pids, Busy + 1, Peak1)
    after 20 ->
        flood_watch([P || P <- Pids, is_process_alive(P)], Busy, Peak1)
    end.

sink() -> sink(0).
sink(N) ->
    receive
        {From, total} -> From ! {sink_total, N};
        Bin when is_binary(Bin) -> sink(N + byte_size(Bin))
    end.

%% Pings Node at the given system time (ms), so two nodes can dial each other at once.
ping_at(Node, AtMs) ->
    timer:sleep(max(0, AtMs - erlang:system_time(millisecond))),
    net_adm:ping(Node).

%%% Directional trust: fixtures on the higher node

%% What an attack from a lower node could disturb, (re)created if it is not as it should
%% be: `results' (allowlisted for the lower tiers; a trapping gen_server under a registered
%% parent, `results_parent'), `victim' (not allowlisted; records what reaches it, does not
%% trap exits), the trust_dist log capture, and runtime_tools running.
trust_fixtures() ->
    ok = ensure_results(),
    ok = ensure_victim(),
    ok = case whereis(trust_dist_probe_logs) of
             undefined -> capture_logs();
             _ -> ok
         end,
    ok = case whereis(trust_dist_probe_reports) of
             undefined -> capture_reports();
             _ -> ok
         end,
    {ok, _} = application:ensure_all_started(runtime_tools),
    ok.

ensure_results() ->
    case results_healthy() of
        true -> ok;
        false ->
            [exit(P, kill) || N <- [results_parent, results], P <- [whereis(N)], is_pid(P)],
            wait_unregistered([results, results_parent], 100),
            start_results()
    end.

results_healthy() ->
    case {whereis(results), whereis(results_parent)} of
        {Pid, Parent} when is_pid(Pid), is_pid(Parent) ->
            %% Not suspended, its state not replaced, and answering calls.
            try {sys:get_status(Pid, 1000), gen_server:call(Pid, get, 1000)} of
                {{status, Pid, _, [_, running | _]}, Seen} when is_list(Seen) -> true;
                _ -> false
            catch _:_ -> false
            end;
        _ -> false
    end.

start_results() ->
    Self = self(),
    Parent = spawn(fun() ->
                           register(results_parent, self()),
                           process_flag(trap_exit, true),
                           {ok, Pid} = gen_server:start_link({local, results}, ?MODULE,
                                                             results, []),
                           Self ! {results_started, self()},
                           receive {'EXIT', Pid, _} -> ok end
                   end),
    receive {results_started, Parent} -> ok after 5000 -> error(results_not_started) end.

wait_unregistered(_Names, 0) -> error(still_registered);
wait_unregistered(Names, N) ->
    case [Name || Name <- Names, whereis(Name) =/= undefined] of
        [] -> ok;
        _ -> timer:sleep(10), wait_unregistered(Names, N - 1)
    end.

ensure_victim() ->
    case whereis(victim) of
        undefined ->
            Self = self(),
            spawn(fun() -> register(victim, self()), Self ! victim_up, victim_loop([]) end),
            receive victim_up -> ok after 5000 -> error(victim_not_started) end;
        _ -> ok
    end.

victim_loop(Seen) ->
    receive
        {'$victim_get', From} -> From ! {victim_seen, lists:reverse(Seen)}, victim_loop(Seen);
        Msg -> victim_loop([Msg | Seen])
    end.

%% Keeps every logger report of the trust_dist domain as the term it is (log/2 keeps
%% text), so a test can check a report's keys.
capture_reports() ->
    Pid = spawn(fun() -> log_store([]) end),
    register(trust_dist_probe_reports, Pid),
    ok = logger:add_handler(trust_dist_probe_reports, ?MODULE,
                            #{level => all,
                              filter_default => stop,
                              filters => [{td, {fun logger_filters:domain/2,
                                                {log, sub, [trust_dist]}}}]}),
    ok.

%% The reports captured so far whose `what' is What (all: every report).
reports(What) ->
    trust_dist_probe_reports ! {get, self()},
    receive
        {lines, Reports} ->
            [R || R <- Reports, is_map(R), What =:= all orelse maps:get(what, R, none) =:= What]
    after 5000 -> []
    end.

%% What `results' has recorded, oldest first; big terms summarised.
results_seen() ->
    try gen_server:call(results, get, 2000) of
        Seen when is_list(Seen) -> [summarise(E) || E <- Seen];
        Other -> {not_results, Other}
    catch
        exit:Why -> {results_unavailable, Why}
    end.

summarise({info, {atoms, Tag, Atoms}}) -> {info, {atoms, Tag, length(Atoms)}};
summarise({info, {big, Tag, Bin}}) -> {info, {big, Tag, byte_size(Bin)}};
summarise(Entry) -> Entry.

%% Waits until `results' has recorded Entry: true, false (not within Ms) or results_down
%% (the process died or was replaced meanwhile).
results_await(Entry, Ms) ->
    Pid = whereis(results),
    results_await(Entry, Pid, erlang:monotonic_time(millisecond) + Ms).

results_await(Entry, Pid, Deadline) ->
    case whereis(results) =:= Pid andalso is_pid(Pid) andalso results_seen() of
        false -> results_down;
        Seen when is_list(Seen) ->
            case lists:member(Entry, Seen) of
                true -> true;
                false ->
                    case erlang:monotonic_time(millisecond) > Deadline of
                        true -> false;
                        false -> timer:sleep(20), results_await(Entry, Pid, Deadline)
                    end
            end;
        _ -> results_down
    end.

%% The raw state of `results' through a local system message (times out if suspended).
results_state() ->
    try sys:get_state(results, 1000) of
        {results, Seen} -> {results, [summarise(E) || E <- lists:reverse(Seen)]};
        Other -> Other
    catch
        exit:Why -> {unavailable, Why}
    end.

victim_seen() ->
    victim ! {'$victim_get', self()},
    receive {victim_seen, Seen} -> Seen after 2000 -> timeout end.

whereis_all(Names) ->
    maps:from_list([{N, whereis(N)} || N <- Names]).

group_leader_of(Name) ->
    {group_leader, Gl} = process_info(whereis(Name), group_leader),
    Gl.

links_of(Name) ->
    {links, Links} = process_info(whereis(Name), links),
    Links.

%% How many monitors processes of Node hold on the process registered as Name.
monitors_from(Name, Node) ->
    {monitored_by, By} = process_info(whereis(Name), monitored_by),
    length([P || P <- By, is_pid(P), node(P) =:= Node]).

%% The identity of the current connection to Node (none if not connected).
connection_id(Node) ->
    case lists:keyfind(Node, 1, erlang:nodes(connected, #{connection_id => true})) of
        {Node, #{connection_id := Id}} -> Id;
        false -> none
    end.

app_running(App) ->
    lists:keymember(App, 1, application:which_applications()).

in_code_path(Dir) ->
    lists:member(Dir, code:get_path()).

%%% Directional trust: code the lower node asks the higher node to run

%% Leaves a marker file: proof that code a peer supplied ran here.
touch(Path) ->
    ok = file:write_file(Path, atom_to_list(node())),
    {touched, node()}.

%% The one function the policy lets the lower tier call through erpc/rpc.
allowed_fun(X) -> {allowed, node(), X}.

%% Same module, not in the policy's rpc list.
forbidden_fun(Path) -> touch(Path).

%%% Directional trust: what the lower node tries (these run on the attacker)

now_ms() -> erlang:monotonic_time(millisecond).

timed(Fun) ->
    T0 = now_ms(),
    Result = try {ok, Fun()} catch Class:Reason -> {Class, Reason} end,
    {Result, now_ms() - T0}.

%% A monitored spawn of touch(Path) on Node: how the process ended and how soon.
try_spawn(Node, Path) ->
    T0 = now_ms(),
    %% Monitored from the start: a refused spawn's process may be gone before a separate
    %% monitor call, which would then report noproc instead of the refusal. spawn_monitor
    %% waits for the spawn reply and raises its error, the same notsup.
    try spawn_monitor(Node, ?MODULE, touch, [Path]) of
        {Pid, Ref} -> await_spawned(Pid, Ref, T0)
    catch
        error:notsup -> {down, notsup, now_ms() - T0}
    end.

await_spawned(Pid, Ref, T0) ->
    receive
        {'DOWN', Ref, process, Pid, Why} -> {down, Why, now_ms() - T0}
    after 3000 ->
        demonitor(Ref, [flush]),
        {alive, Pid}
    end.

try_erpc(Node, M, F, A) ->
    timed(fun() -> erpc:call(Node, M, F, A, 3000) end).

try_rpc(Node, M, F, A) ->
    timed(fun() -> rpc:call(Node, M, F, A, 3000) end).

send_to(Dest, Msg) ->
    Dest ! Msg,
    ok.

send_exit(Pid, Reason) ->
    exit(Pid, Reason),
    ok.

%% A process here links to Pid, then dies abnormally.
link_then_exit(Pid) ->
    {P, Ref} = spawn_monitor(fun() -> link(Pid), timer:sleep(200), exit(trust_attack) end),
    receive {'DOWN', Ref, process, P, Why} -> Why after 3000 -> timeout end.

%% Makes a process of this node the group leader of Pid (on another node).
set_group_leader(Pid) ->
    Leader = park(),
    group_leader(Leader, Pid),
    Leader.

try_replace_state(Dest) ->
    timed(fun() -> sys:replace_state(Dest, fun ?MODULE:hijack/1, 1000) end).

hijack(_State) -> hijacked.

try_suspend(Dest) ->
    timed(fun() -> sys:suspend(Dest, 1000) end).

%% An {'EXIT', Parent, shutdown} message, as if the parent had died.
forged_exit(Dest, Parent) ->
    Dest ! {'EXIT', Parent, shutdown},
    ok.

%% {stop, stop} to init, by name and by its (guessed) pid.
init_stop(Node, InitPid) ->
    {init, Node} ! {stop, stop},
    InitPid ! {stop, stop},
    ok.

%% rex runs what it is sent: a cast and a call in the legacy rpc forms.
rex_attack(Node, CastPath, CallPath) ->
    gen_server:cast({rex, Node}, {cast, ?MODULE, touch, [CastPath], group_leader()}),
    timed(fun() ->
                  gen_server:call({rex, Node}, {call, ?MODULE, touch, [CallPath], group_leader()},
                                  1000)
          end).

%% Asks the victim's net_kernel to drop its connection to Other.
net_kernel_attack(Node, Other) ->
    timed(fun() -> gen_server:call({net_kernel, Node}, {disconnect, Other}, 1000) end).

%% Asks the victim's code server to put Dir first in the code path (OTP 25 and OTP 26+
%% request forms) and to load a module Mod compiled here.
code_server_attack(Node, Dir, Mod) ->
    Forms = [{attribute, 1, module, Mod}, {attribute, 2, export, [{f, 0}]},
             {function, 3, f, 0, [{clause, 3, [], [], [{atom, 3, ok}]}]}],
    {ok, Mod, Bin} = compile:forms(Forms, []),
    %% From a process of its own: the code server's replies ({code_server, _}) must not
    %% reach a process that later asks its own code server for something.
    spawn(fun() ->
                  Server = {code_server, Node},
                  Server ! {code_call, self(), {add_path, first, Dir}},
                  Server ! {code_call, self(), {add_path, first, Dir, nocache}},
                  Server ! {code_call, self(), {load_binary, Mod, atom_to_list(Mod) ++ ".erl", Bin}},
                  timer:sleep(1000)
          end),
    ok.

appctl_attack(Node, App) ->
    timed(fun() -> gen_server:call({application_controller, Node}, {stop_application, App},
                                   1000)
          end).

%% global's registrar runs the fun it is sent (with the list of known nodes).
global_attack(Node, Path) ->
    timed(fun() ->
                  gen_server:call({global_name_server, Node},
                                  {registrar, fun(_Nodes) -> touch(Path) end}, 1000)
          end).

%% N fresh atoms (made here, unknown on the receiver), Batch per message, then
%% {atoms_done, Tag}.
atom_flood(Dest, Tag, N, Batch) ->
    Prefix = "trust_dist_fresh_" ++ integer_to_list(Tag) ++ "_",
    send_atoms(Dest, Tag, Prefix, 0, N, Batch),
    Dest ! {atoms_done, Tag},
    ok.

send_atoms(_Dest, _Tag, _Prefix, I, N, _Batch) when I >= N -> ok;
send_atoms(Dest, Tag, Prefix, I, N, Batch) ->
    Atoms = [list_to_atom(Prefix ++ integer_to_list(J)) || J <- lists:seq(I, min(N, I + Batch) - 1)],
    Dest ! {atoms, Tag, Atoms},
    send_atoms(Dest, Tag, Prefix, I + Batch, N, Batch).

%% {big, Tag, Size bytes}, then {big_done, Tag}.
big_message(Dest, Tag, Size) ->
    Dest ! {big, Tag, binary:copy(<<7>>, Size)},
    Dest ! {big_done, Tag},
    ok.

%% A process here takes N monitors on Target and counts the DOWNs that come back within
%% WaitMs; it keeps its monitors until release/1. Returns {Holder, #{Reason => Count},
%% Elapsed}.
monitor_flood(Target, N, WaitMs) ->
    Caller = self(),
    Holder = spawn(fun() ->
                           T0 = now_ms(),
                           _ = [monitor(process, Target) || _ <- lists:seq(1, N)],
                           Downs = collect_downs(N, T0 + WaitMs, #{}),
                           Caller ! {flood_report, self(), Downs, now_ms() - T0},
                           receive release -> ok after 60000 -> ok end
                   end),
    receive
        {flood_report, Holder, Downs, Ms} -> {Holder, Downs, Ms}
    after WaitMs + 5000 -> {Holder, timeout, WaitMs + 5000}
    end.

collect_downs(0, _Deadline, Acc) -> Acc;
collect_downs(Left, Deadline, Acc) ->
    receive
        {'DOWN', _, process, _, Why} ->
            collect_downs(Left - 1, Deadline, maps:update_with(Why, fun(C) -> C + 1 end, 1, Acc))
    after max(0, Deadline - now_ms()) -> Acc
    end.

release(Holder) ->
    Holder ! release,
    ok.

%% Writes one REG_SEND distribution packet by hand on the link to Node, with From as the
%% sender pid in the control message: a pid of this node, or one it merely claims.
%% Restricted links negotiate no atom cache, so the packet is a pass-through one.
inject_reg_send(Node, From, ToName, Msg) ->
    [Link] = [L || {N, L, _} <- trust_dist_server:links(), N =:= Node],
    Packet = <<112, (term_to_binary({6, From, '', ToName}))/binary,
               (term_to_binary(Msg))/binary>>,
    trust_dist_nif:send(Link, [Packet]).

%% Monitors Dest (pid or {Name, Node}) for Ms: alive, or {down, Reason}.
monitor_alive(Dest, Ms) ->
    Ref = monitor(process, Dest),
    receive {'DOWN', Ref, process, _, Why} -> {down, Why}
    after Ms -> demonitor(Ref, [flush]), alive
    end.

%% A process registered as Name that takes gen_server calls, keeps the caller's From and
%% replies {genuine, Request} after DelayMs.
start_slow(Name, DelayMs) ->
    Self = self(),
    spawn(fun() -> register(Name, self()), Self ! slow_up, slow_loop(DelayMs, none) end),
    receive slow_up -> ok after 5000 -> error(slow_not_started) end.

slow_loop(DelayMs, Last) ->
    receive
        {'$gen_call', From, Request} ->
            _ = timer:apply_after(DelayMs, gen, reply, [From, {genuine, Request}]),
            slow_loop(DelayMs, From);
        {last_from, Pid} -> Pid ! {last_from, Last}, slow_loop(DelayMs, Last)
    end.

slow_last_from(Name) ->
    Name ! {last_from, self()},
    receive {last_from, From} -> From after 2000 -> timeout end.

%% Sends Reply to the caller behind a gen_server From, as the callee would: through its
%% alias (OTP 24+ callers) or to its pid.
forge_reply({Pid, Tag}, Reply) ->
    case Tag of
        [alias | Alias] -> Alias ! {Tag, Reply};
        _ -> Pid ! {Tag, Reply}
    end,
    ok.

%%% Directional trust: what the higher node does downward

%% A process here whose group leader captures io spawns io:put_chars(Text) on Node; the
%% output must land here. Returns what the group leader captured.
remote_io(Node, Text) ->
    remote_io(Node, io, put_chars, [Text]).

%% The same with io:format(Format, Args), which asks the group leader to run io_lib:format.
remote_io_format(Node, Format, Args) ->
    remote_io(Node, io, format, [Format, Args]).

remote_io(Node, M, F, A) ->
    Gl = spawn(fun() -> capture_gl([]) end),
    Self = self(),
    spawn(fun() ->
                  group_leader(Gl, self()),
                  Pid = spawn(Node, M, F, A),
                  Ref = monitor(process, Pid),
                  receive {'DOWN', Ref, _, _, _} -> ok after 5000 -> ok end,
                  Self ! {remote_io_done, Gl}
          end),
    receive {remote_io_done, Gl} -> ok after 6000 -> ok end,
    Gl ! {get, self()},
    receive {captured, Chars} -> exit(Gl, kill), Chars after 2000 -> timeout end.

capture_gl(Acc) ->
    receive
        {io_request, From, ReplyAs, Req} ->
            {Reply, Acc1} = io_req(Req, Acc),
            From ! {io_reply, ReplyAs, Reply},
            capture_gl(Acc1);
        {get, From} ->
            From ! {captured, iolist_to_binary(lists:reverse(Acc))},
            capture_gl(Acc)
    end.

io_req({put_chars, Enc, Chars}, Acc) ->
    {ok, [unicode:characters_to_binary(Chars, Enc) | Acc]};
io_req({put_chars, Enc, M, F, A}, Acc) ->
    io_req({put_chars, Enc, apply(M, F, A)}, Acc);
io_req({put_chars, Chars}, Acc) ->
    io_req({put_chars, latin1, Chars}, Acc);
io_req(_Other, Acc) ->
    {{error, enotsup}, Acc}.

%% exit(Pid, kill) on a process parked on Node; how it ended.
remote_kill(Node) ->
    Pid = erpc:call(Node, ?MODULE, park, []),
    Ref = monitor(process, Pid),
    exit(Pid, kill),
    receive {'DOWN', Ref, process, Pid, Why} -> {down, Why} after 3000 -> alive end.

global_register(Name) ->
    Pid = park(),
    yes = global:register_name(Name, Pid),
    Pid.

global_lookup(Name) ->
    global:whereis_name(Name).

%%% A stand-in for the `telemetry' library (a Hex package, not available here): the
%%% carrier's bridge calls telemetry:execute/3 when that function is loaded. The test
%%% loads this module under that name on one node only.

telemetry_stub_source() ->
    "-module(telemetry).\n"
    "-export([execute/3]).\n"
    "execute(Event, Measurements, Metadata) ->\n"
    "    case whereis(trust_dist_probe_telemetry) of\n"
    "        undefined -> ok;\n"
    "        Sink -> Sink ! {event, Event, Measurements, Metadata}, ok\n"
    "    end.\n".

%% Loads the stand-in and starts collecting its events.
telemetry_start() ->
    Dir = filename:join(os:getenv("TMPDIR", "/tmp"), "trust_dist_telemetry_" ++ os:getpid()),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    File = filename:join(Dir, "telemetry.erl"),
    ok = file:write_file(File, telemetry_stub_source()),
    {ok, telemetry, Bin} = compile:file(File, [binary]),
    {module, telemetry} = code:load_binary(telemetry, File, Bin),
    Sink = spawn(fun() -> telemetry_sink([]) end),
    true = register(trust_dist_probe_telemetry, Sink),
    ok.

telemetry_sink(Events) ->
    receive
        {event, Event, Measurements, Metadata} ->
            telemetry_sink([{Event, Measurements, Metadata} | Events]);
        {get, From} ->
            From ! {events, lists:reverse(Events)},
            telemetry_sink(Events)
    end.

telemetry_events() ->
    trust_dist_probe_telemetry ! {get, self()},
    receive {events, Events} -> Events after 5000 -> timeout end.

%%% The red team: the victim's side (test/redteam_test.exs)

%% On the victim: the directional-trust fixtures plus the red team's canaries, all of
%% which record whatever reaches them:
%% - `events', a gen_event manager with one recording handler (exposed to the worker
%%   tier: its handlers must not change and it must not stop);
%% - `drain', exposed, counts and discards (the target of the message flood);
%% - `alias_canary', not exposed, holds an active alias (the "guessed alias" target);
%% - `pong', exposed to the witness tier, answers calls (responsiveness on another link).
%% Returns what the attacker is told (it could guess all of it).
redteam_fixtures() ->
    ok = trust_fixtures(),
    %% Every atom the attacker's cases name (its module's literals) then exists here, so
    %% a case is judged by the rule it aims at, not only by "no new atoms". The atoms it
    %% makes at run time (fresh_atom/0) stay unknown here.
    {module, _} = code:ensure_loaded(trust_dist_attacker),
    %% proc_lib names the arguments of a process's initial call 'Argument__N' (atoms made
    %% on first use) when one of its processes ends by an exception (proc_lib:exit_p/3);
    %% the VM's own processes do so now and then, whatever the attacker sends.
    _ = [list_to_atom("Argument__" ++ integer_to_list(N)) || N <- lists:seq(1, 9)],
    %% All code of the running applications loaded, as in an embedded-mode release:
    %% loading a module on first use (timer, sets, ...) adds its literal atoms, which would
    %% blur "the attacker grew the atom table".
    _ = [code:ensure_loaded(M) || {App, _, _} <- application:which_applications(),
                                  {ok, Ms} <- [application:get_key(App, modules)], M <- Ms],
    case whereis(events) of
        undefined ->
            {ok, Ev} = gen_event:start({local, events}),
            ok = gen_event:add_handler(Ev, ?MODULE, event_canary);
        _ -> ok
    end,
    ensure_registered(drain, fun() -> drain_loop(0) end),
    ensure_registered(alias_canary, fun() -> alias_canary_loop(alias(), []) end),
    case whereis(pong) of
        undefined -> start_server(pong);
        _ -> ok
    end,
    alias_canary ! {get_alias, self()},
    Alias = receive {alias_canary_alias, A} -> A after 2000 -> error(no_alias) end,
    System = [init, code_server, application_controller, rex, global_name_server, net_kernel,
              logger, user, file_server_2, kernel_sup, erl_prim_loader, inet_db, auth,
              global_group, standard_error],
    #{victim_pid => whereis(victim), results => whereis(results),
      results_parent => whereis(results_parent), alias => Alias,
      system => maps:from_list([{N, whereis(N)} || N <- System, is_pid(whereis(N))])}.

ensure_registered(Name, Loop) ->
    case whereis(Name) of
        undefined ->
            Self = self(),
            spawn(fun() -> register(Name, self()), Self ! {up, Name}, Loop() end),
            receive {up, Name} -> ok after 5000 -> error({not_started, Name}) end;
        _ -> ok
    end.

drain_loop(N) ->
    receive
        {'$drain_count', From} -> From ! {drain_count, N}, drain_loop(N);
        _ -> drain_loop(N + 1)
    end.

drain_count() ->
    drain ! {'$drain_count', self()},
    receive {drain_count, N} -> N after 5000 -> timeout end.

alias_canary_loop(Alias, Seen) ->
    receive
        {get_alias, From} -> From ! {alias_canary_alias, Alias}, alias_canary_loop(Alias, Seen);
        {'$alias_seen', From} -> From ! {alias_seen, lists:reverse(Seen)}, alias_canary_loop(Alias, Seen);
        Msg -> alias_canary_loop(Alias, [Msg | Seen])
    end.

alias_canary_seen() ->
    alias_canary ! {'$alias_seen', self()},
    receive {alias_seen, Seen} -> Seen after 2000 -> timeout end.

%% On the victim: everything a case could have changed. Compared by the test before and
%% after each case; `memory' and `atoms' are compared with their own rules.
redteam_snapshot(Attacker, Witness) ->
    Watched = [init, code_server, application_controller, rex, global_name_server,
               logger, user, file_server_2, kernel_sup, erl_prim_loader, inet_db, auth,
               global_group, standard_error, results, results_parent, victim, events,
               drain, alias_canary, pong],
    Procs = [{N, whereis(N)} || N <- Watched],
    FromAttacker = fun(Item) ->
                           lists:sort([{N, length([P || P <- Ps, is_pid(P), node(P) =:= Attacker])}
                                       || {N, Pid} <- Procs, is_pid(Pid),
                                          {_, Ps} <- [process_info(Pid, Item)]])
                   end,
    #{atoms => erlang:system_info(atom_count),
      memory => erlang:memory(total),
      processes => erlang:system_info(process_count),
      init_status => init:get_status(),
      whereis => Procs,
      registered => lists:sort(registered()),
      group_leaders => [{N, element(2, process_info(P, group_leader))} || {N, P} <- Procs, is_pid(P)],
      links_from_attacker => FromAttacker(links),
      monitors_from_attacker => FromAttacker(monitored_by),
      results_status => results_healthy(),
      results_seen => results_seen(),
      victim_seen => victim_seen(),
      alias_seen => alias_canary_seen(),
      events_handlers => catch gen_event:which_handlers(events),
      events_seen => catch gen_event:call(events, ?MODULE, get, 2000),
      code_path => code:get_path(),
      cookie => erlang:get_cookie(),
      apps => lists:sort([A || {A, _, _} <- application:which_applications()]),
      global_names => lists:sort(global:registered_names()),
      logger_level => maps:get(level, logger:get_primary_config()),
      logger_handlers => lists:sort(logger:get_handler_ids()),
      connected => lists:sort(nodes(connected)),
      witness_connection => connection_id(Witness),
      %% Links the filter closed (its own log line): a link that closes without one was
      %% closed by the VM's decoder, which means a packet got past the filter.
      filter_closes => length([L || L <- logs(), is_binary(L),
                                    binary:match(L, <<"closed: refused ">>) =/= nomatch]),
      attacker_connection => connection_id(Attacker),
      %% What the filter refused on the attacker's current link so far.
      attacker_refused => lists:sum([maps:get(denied, L, 0) || L <- trust_dist:links(),
                                                              maps:get(node, L) =:= Attacker])}.

%% On the victim, after a case: waits until the connection to the attacker is gone or
%% replaced (`closed') or `results' has {sync, Tag} and the filter has not closed the
%% link (every packet of the case was judged and the link is still up: `synced'), at
%% most Ms (`timeout'). The sync alone does not say the link is up: the barrier holds it
%% back only until the packets before it are judged, so when one of them makes the
%% filter close the link, the sync may still go up (from another lane's delivery) before
%% the close takes effect; then this waits until the connection is gone.
redteam_settle(Tag, Attacker, Connection, Ms) ->
    redteam_settle(Tag, Attacker, Connection, erlang:monotonic_time(millisecond) + Ms, 0).

redteam_settle(Tag, Attacker, Connection, Deadline, N) ->
    Synced = case results_seen() of
                 Seen when is_list(Seen) -> lists:member({info, {sync, Tag}}, Seen);
                 _ -> false
             end,
    Kept = Synced andalso filter_kept(Attacker),
    Gone = Connection =/= none andalso connection_id(Attacker) =/= Connection,
    Now = erlang:monotonic_time(millisecond),
    if
        Gone -> closed;
        Kept -> synced;
        Now > Deadline -> timeout;
        true ->
            timer:sleep(min(5 * (N + 1), 50)),
            redteam_settle(Tag, Attacker, Connection, Deadline, N + 1)
    end.

%% Whether the newest link to Node (trust_dist:links/0 lists it first) is still listed
%% and no packet made its filter close it: the `closed' counts are taken when a packet is
%% judged, before anything behind it goes up.
filter_kept(Node) ->
    case [L || L <- trust_dist:links(), maps:get(node, L) =:= Node] of
        [#{counters := Counters} | _] ->
            lists:sum([maps:get(closed, ByOutcome, 0) || ByOutcome <- maps:values(Counters)]) =:= 0;
        [] -> false
    end.

%% The atoms created on this node since the atom table held Count (at most Max of them),
%% to name them when a case grew the table. Reads the table by index through the
%% emulator's internal atom reference form.
atoms_since(Count, Max) ->
    Now = erlang:system_info(atom_count),
    [binary_to_term(<<131, 75, I:24>>) || I <- lists:seq(Count, min(Now, Count + Max) - 1)].
