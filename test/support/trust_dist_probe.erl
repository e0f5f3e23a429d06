%% Test-only code that runs on the BEAM nodes of the test suite. Each function is called
%% through peer:call on one node and acts on another node over the carrier under test.
-module(trust_dist_probe).
-behaviour(gen_server).

-export([start_echo/1, echo_roundtrip/3, alias_roundtrip/1, send_to_alias/2,
         transfer/3, hash_receiver/0, ordered_senders/3, collector/3,
         start_server/1, server_call/3, link_exit/2, monitor_down/2, monitor_noproc/1,
         spawn_link_remote/1, hello_and_exit/1, remote_exit_after/2, rpc_and_erpc/1, park/0,
         watch_nodes/0, await_nodedown/2, remote_pid/2, pid_status/2, global_pg/1,
         inject_garbage/2, flood/3, sink/0, ping_at/2, capture_logs/0, logs/0, log/2, atom_exists/1]).
-export([init/1, handle_call/3, handle_cast/2]).

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

init([]) -> {ok, #{}}.
handle_call(Request, _From, State) -> {reply, {pong, node(), Request}, State}.
handle_cast(_Msg, State) -> {noreply, State}.

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
        {get, From} -> From ! {lines, lists:reverse(Lines)}, log_store(Lines)
    end.

logs() ->
    trust_dist_probe_logs ! {get, self()},
    receive {lines, Lines} -> Lines after 5000 -> [] end.

%% logger handler callback
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
