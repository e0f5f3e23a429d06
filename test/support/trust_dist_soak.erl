%% Test-only code for the soak test (test/soak_test.exs): fixtures, legitimate load and
%% attacks that run on the nodes for the whole soak, and the samples the test takes.
%%
%% Everything here is started through peer:call and lives in processes of its own; every
%% loop stops by itself at the deadline it was given. Outcomes are counted in the ETS
%% table `soak_counts' of each node:
%%   {ok, Class} / {fail, Class}        legitimate operations this node drove
%%   {attack, Kind} / {refused, Kind}   attacks this node made / saw refused on its side
%%   {breach, Kind}                     an attack that had an effect (must stay absent)
%%   {effect, What}                     something an attack would cause on this node
%%   {nodedown, Node} / {nodeup, Node}  connection events seen here
%%   {log, trust_dist | other}          log events (counted, not printed)
%% and the last failure of each class is kept as {last_fail, Class} (one entry per class,
%% so the table stays bounded however long the soak runs).
-module(trust_dist_soak).
-behaviour(gen_server).

-export([setup/1, info/0, sample/0, running/0, counts/0, fresh/0, atoms_present/1, effects/1]).
-export([start_load/2, start_attacks/3]).
%% Called over distribution by the load (allowlisted for lower tiers: allowed/1 only).
-export([echo/1, allowed/1, hold/0, touch/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).
%% logger handler callback
-export([log/2]).

-define(TAB, soak_counts).
%% The name every lower tier may send to and call (the policy's `registered').
-define(INBOX, soak_inbox).

%%% Fixtures (every node)

%% Starts, once, the table owner, the allowlisted inbox, a downward gen_server and echo
%% process, a victim that must never hear from a lower tier, and a node watcher.
%% MarkerDir is where code an attacker managed to run would leave a file.
setup(MarkerDir) ->
    case whereis(soak_holder) of
        undefined ->
            Self = self(),
            Holder = spawn(fun() ->
                                   ?TAB = ets:new(?TAB, [named_table, public, set,
                                                         {write_concurrency, true}]),
                                   register(soak_holder, self()),
                                   Self ! {soak_holder, self()},
                                   holder_loop()
                           end),
            receive {soak_holder, Holder} -> ok after 5000 -> error(soak_holder) end,
            persistent_term:put({?MODULE, marker_dir}, MarkerDir),
            {ok, _} = gen_server:start({local, ?INBOX}, ?MODULE, inbox, []),
            {ok, _} = gen_server:start({local, soak_server}, ?MODULE, server, []),
            register(soak_echo, spawn(fun echo_loop/0)),
            register(soak_victim, spawn(fun victim_loop/0)),
            Watch = spawn(fun() ->
                                  ok = net_kernel:monitor_nodes(true, [{node_type, all}]),
                                  watch_loop()
                          end),
            register(soak_watch, Watch),
            count_logs(),
            ok;
        _ ->
            ok
    end.

%% Log events are counted instead of printed: the attackers cause thousands of denials a
%% second, and the soak's output is its table. The carrier's own rate limit still decides
%% what reaches logger; the counts show it.
count_logs() ->
    _ = logger:remove_handler(default),
    ok = logger:add_handler(soak_log_count, ?MODULE, #{level => all}).

log(#{meta := Meta}, _Config) ->
    case maps:get(domain, Meta, []) of
        [trust_dist | _] -> bump({log, trust_dist});
        _ -> bump({log, other})
    end,
    ok.

holder_loop() ->
    receive stop -> ok end.

%% What attackers get told about this node: the pids they will "guess".
info() ->
    #{node => node(), victim => whereis(soak_victim), inbox => whereis(?INBOX),
      server => whereis(soak_server), os_pid => os:getpid()}.

bump(Key) -> bump(Key, 1).
bump(Key, N) -> ets:update_counter(?TAB, Key, N, {Key, 0}).

counts() ->
    [{K, V} || {K, V} <- ets:tab2list(?TAB), is_integer(V)].

%% One sample of this node, taken by the test every interval.
sample() ->
    Links = [maps:with([node, mode, tier, counters, denied, bytes_in, bytes_out,
                        packets_in, packets_out], L)
             || L <- trust_dist:links()],
    #{memory => erlang:memory(total),
      carriers => carriers(),
      atoms => erlang:system_info(atom_count),
      processes => erlang:system_info(process_count),
      links => Links,
      counts => counts(),
      last_fail => [{K, V} || {{last_fail, _} = K, V} <- ets:tab2list(?TAB)],
      victim => whereis(soak_victim),
      inbox => whereis(?INBOX),
      init => init:get_status(),
      time => erlang:monotonic_time(millisecond)}.

%% What the VM's allocators hold from the OS (erlang:memory counts the blocks in use in
%% them): with the resident size, it tells the VM's memory from the NIF's.
carriers() ->
    {ok, {_, Carriers}} = instrument:carriers(),
    lists:sum([Size || {_Type, _InPool, Size, _Unscanned, _Allocs, _Hist} <- Carriers]).

%% How many load and attack loops of this node are still running.
running() ->
    length([P || P <- loops(), is_process_alive(P)]).

loops() ->
    case ets:lookup(?TAB, loops) of
        [{loops, Pids}] -> Pids;
        [] -> []
    end.

add_loops(Pids) ->
    %% Only the test process (one peer:call at a time) adds loops.
    ets:insert(?TAB, {loops, Pids ++ loops()}).

%% The atom names this node's floods sent last, per target.
fresh() ->
    [{T, Names} || {{fresh, T}, Names} <- ets:tab2list(?TAB)].

%% Which of the given atom names exist on this node (must be none).
atoms_present(Names) ->
    [N || N <- Names, exists(N)].

exists(Name) ->
    try binary_to_existing_atom(Name, utf8) of _ -> true catch error:badarg -> false end.

%% What attacks of the soak would change here: the victim's group leader and the code
%% path (an attacker asks for MarkerDir first in it).
effects(MarkerDir) ->
    {group_leader, Gl} = process_info(whereis(soak_victim), group_leader),
    #{victim_group_leader => node(Gl),
      code_path_changed => lists:member(MarkerDir, code:get_path())}.

%%% The fixtures' processes

init(inbox) -> {ok, #{}};
init(server) -> {ok, server}.

%% The inbox counts what each lower node sent; anything else that reaches it is an
%% attack that got through.
handle_call({seen, Node}, _From, Seen) when is_map(Seen) ->
    {reply, maps:get(Node, Seen, 0), Seen};
handle_call({echo, Bin}, _From, server) ->
    {reply, {echo, erlang:phash2(Bin)}, server};
handle_call(_Other, _From, State) ->
    bump({effect, unexpected_call}),
    {reply, unexpected, State}.

handle_cast(_Msg, State) ->
    bump({effect, unexpected_cast}),
    {noreply, State}.

handle_info({soak_up, Node, _Seq, Bin}, Seen) when is_map(Seen), is_binary(Bin) ->
    {noreply, maps:update_with(Node, fun(N) -> N + 1 end, 1, Seen)};
handle_info(_Msg, State) ->
    bump({effect, unexpected_info}),
    {noreply, State}.

echo_loop() ->
    receive
        {From, Seq, Bin} when is_pid(From), is_binary(Bin) ->
            From ! {soak_echo, Seq, erlang:phash2(Bin)};
        _ ->
            bump({effect, unexpected_echo})
    end,
    echo_loop().

%% Not in any policy: every message that reaches it came through a hole.
victim_loop() ->
    receive _ -> bump({effect, victim_message}) end,
    victim_loop().

watch_loop() ->
    receive
        {nodedown, Node, _} -> bump({nodedown, Node});
        {nodeup, Node, _} -> bump({nodeup, Node});
        _ -> ok
    end,
    watch_loop().

%%% Called over distribution

echo(Bin) -> erlang:phash2(Bin).

%% The one function of this module the policies let a lower tier call.
allowed(X) -> {allowed, node(), X}.

%% A process a higher node spawns here, links and monitors, then drops or ends.
hold() ->
    receive
        {exit, Reason} -> exit(Reason);
        stop -> ok
    after 30000 -> timeout
    end.

%% Proof that code a peer supplied ran here.
touch(Path) ->
    ok = file:write_file(Path, atom_to_list(node())),
    {touched, node()}.

%%% Legitimate load

now_ms() -> erlang:monotonic_time(millisecond).

%% Plan: [{Class, Kind, Target}]; each entry becomes a loop running for Ms. Kinds:
%% erpc, gen_call, pid_echo, monlink (downward or same tier), up_send, up_rpc (a lower
%% tier to what the policy allows). Returns the loop pids.
start_load(Plan, Ms) ->
    Deadline = now_ms() + Ms,
    Pids = [spawn(fun() ->
                          rand:seed(exsss),
                          Blob = crypto:strong_rand_bytes(1024 * 1024),
                          load_loop(Class, Kind, Target, Blob, Deadline, 0)
                  end)
            || {Class, Kind, Target} <- Plan],
    add_loops(Pids),
    Pids.

load_loop(Class, Kind, Target, Blob, Deadline, Seq) ->
    case now_ms() < Deadline of
        false -> ok;
        true ->
            Result = try op(Kind, Target, payload(Blob), Seq)
                     catch C:R -> {C, R}
                     end,
            case Result of
                ok -> bump({ok, Class});
                Why ->
                    bump({fail, Class}),
                    ets:insert(?TAB, {{last_fail, Class}, {Kind, Target, Why}})
            end,
            %% A short pause keeps the offered load below what five VMs on two shared
            %% cores can carry, so a slowdown shows up as lost throughput, not as noise.
            timer:sleep(2),
            load_loop(Class, Kind, Target, Blob, Deadline, Seq + 1)
    end.

%% Sizes from bytes to 1 MiB: mostly small, sometimes tens of KiB, rarely 1 MiB.
payload(Blob) ->
    Size = case rand:uniform(100) of
               R when R =< 60 -> rand:uniform(100);
               R when R =< 90 -> 1024 * rand:uniform(16);
               R when R =< 99 -> 1024 * (64 + rand:uniform(192));
               _ -> 1024 * 1024
           end,
    binary:part(Blob, 0, Size).

%% erpc and gen_call run in a fresh process each time, as short-lived request processes
%% do: every one is a new pid handed to the peer, so the filter's grant table of a
%% restricted link turns over (16 Ki pids) within a minute or two, while the long-lived
%% pid of pid_echo on the same link must stay reachable.
op(erpc, T, Bin, _Seq) ->
    in_fresh(fun() -> expect(erlang:phash2(Bin), erpc:call(T, ?MODULE, echo, [Bin], 15000)) end);
op(gen_call, T, Bin, _Seq) ->
    in_fresh(fun() ->
                     expect({echo, erlang:phash2(Bin)},
                            gen_server:call({soak_server, T}, {echo, Bin}, 15000))
             end);
op(pid_echo, T, Bin, Seq) ->
    %% The same long-lived pid is handed to the peer again and again, which answers it.
    {soak_echo, T} ! {self(), Seq, Bin},
    Hash = erlang:phash2(Bin),
    receive {soak_echo, Seq, Got} -> expect(Hash, Got)
    after 15000 -> {timeout, pid_echo}
    end;
op(monlink, T, _Bin, Seq) ->
    in_fresh(fun() -> monlink(T, Seq) end);
op(up_send, T, Bin, Seq) ->
    %% A few messages to the allowlisted name, then ask how many arrived.
    Sent = case get(up_sent) of undefined -> 0; S -> S end,
    N = 3,
    [{?INBOX, T} ! {soak_up, node(), Seq, Bin} || _ <- lists:seq(1, N)],
    put(up_sent, Sent + N),
    expect(Sent + N, gen_server:call({?INBOX, T}, {seen, node()}, 15000));
op(up_rpc, T, _Bin, Seq) ->
    expect({allowed, T, Seq}, erpc:call(T, ?MODULE, allowed, [Seq], 15000)).

in_fresh(Fun) ->
    {P, Ref} = spawn_monitor(fun() -> exit({done, Fun()}) end),
    receive
        {'DOWN', Ref, process, P, {done, Result}} -> Result;
        {'DOWN', Ref, process, P, Why} -> {crashed, Why}
    after 40000 -> exit(P, kill), {timeout, in_fresh}
    end.

expect(X, X) -> ok;
expect(Want, Got) -> {unexpected, Want, Got}.

%% Link and monitor a process spawned on T, then either drop both and stop it, or have
%% it exit and receive both signals.
monlink(T, Seq) ->
    process_flag(trap_exit, true),
    P = spawn(T, ?MODULE, hold, []),
    link(P),
    Ref = monitor(process, P),
    case Seq rem 2 of
        0 ->
            unlink(P),
            true = demonitor(Ref, [flush]),
            Ref2 = monitor(process, P),
            P ! stop,
            receive {'DOWN', Ref2, process, P, normal} -> ok
            after 15000 -> {timeout, drop}
            end;
        1 ->
            Reason = {soak_exit, Seq},
            P ! {exit, Reason},
            receive
                {'DOWN', Ref, process, P, Reason} ->
                    receive {'EXIT', P, Reason} -> ok
                    after 15000 -> {timeout, exit}
                    end
            after 15000 -> {timeout, down}
            end
    end.

%%% Attacks (run on a lower tier against a higher one)

%% Targets: [info()] of higher nodes this node is connected to. Third: a pid of another
%% node that this node knows (for spoofed senders). Runs one loop per target for Ms.
start_attacks(Targets, Third, Ms) ->
    Deadline = now_ms() + Ms,
    Dir = persistent_term:get({?MODULE, marker_dir}),
    Pids = [spawn(fun() -> attack_loop(T, Third, Dir, Deadline, 0) end) || T <- Targets],
    add_loops(Pids),
    Pids.

-define(KINDS, [spawn, erpc, rpc, exit_guess, system_names, system_msg, atom_flood, spoof,
                monitor_flood, forged_exit, link, group_leader]).

attack_loop(T, Third, Dir, Deadline, I) ->
    case now_ms() < Deadline of
        false -> ok;
        true ->
            Kinds = ?KINDS,
            Kind = lists:nth(I rem length(Kinds) + 1, Kinds),
            bump({attack, Kind}),
            Outcome = try attack(Kind, T, Third, Dir, I)
                      catch C:R -> {breach, {C, R}}
                      end,
            case Outcome of
                refused -> bump({refused, Kind});
                sent -> ok;
                {breach, Why} ->
                    bump({breach, Kind}),
                    ets:insert(?TAB, {{last_fail, {attack, Kind}}, Why})
            end,
            timer:sleep(50),
            attack_loop(T, Third, Dir, Deadline, I + 1)
    end.

marker(Dir, Kind, I) ->
    filename:join(Dir, lists:concat([Kind, "-", node(), "-", I])).

%% Each clause says what "refused" looks like from the attacker's side; those that leave
%% nothing to observe here return `sent' and are checked by their absent effect on the
%% target.
attack(spawn, #{node := T}, _, Dir, I) ->
    Pid = spawn(T, ?MODULE, touch, [marker(Dir, spawn, I)]),
    Ref = monitor(process, Pid),
    %% A refused spawn returns a local process that exits with notsup at once; if it is
    %% gone before the monitor is set, the monitor says noproc. A remote pid means the
    %% spawn happened.
    Local = node(Pid) =:= node(),
    receive
        {'DOWN', Ref, process, Pid, notsup} when Local -> refused;
        {'DOWN', Ref, process, Pid, noproc} when Local -> refused;
        {'DOWN', Ref, process, Pid, Why} -> {breach, {Why, node(Pid)}}
    after 5000 -> demonitor(Ref, [flush]), {breach, alive}
    end;
attack(erpc, #{node := T}, _, Dir, I) ->
    try erpc:call(T, ?MODULE, touch, [marker(Dir, erpc, I)], 5000) of
        R -> {breach, R}
    catch error:{erpc, notsup} -> refused
    end;
attack(rpc, #{node := T}, _, Dir, I) ->
    case rpc:call(T, ?MODULE, touch, [marker(Dir, rpc, I)], 5000) of
        {badrpc, _} -> refused;
        R -> {breach, R}
    end;
attack(exit_guess, #{victim := V, inbox := Inbox}, _, _, I) ->
    %% The victim, the inbox, and a low pid of the target (init is <0.0.0>, the
    %% kernel's processes follow): all guessed, none handed out.
    [exit(P, kill) || P <- [V, Inbox, guess_pid(V, I rem 64)]],
    sent;
attack(system_names, #{node := T}, Third, Dir, I) ->
    {init, T} ! {stop, stop},
    {rex, T} ! {'$gen_cast', {cast, ?MODULE, touch, [marker(Dir, rex, I)], group_leader()}},
    {net_kernel, T} ! {'$gen_call', {self(), make_ref()}, {disconnect, node(Third)}},
    {code_server, T} ! {code_call, self(), {add_path, first, Dir}},
    sent;
attack(system_msg, #{node := T}, _, _, I) ->
    %% sys:suspend / sys:get_state through the allowlisted name must go unanswered.
    Dest = {?INBOX, T},
    try
        case I rem 2 of
            0 -> sys:suspend(Dest, 500), sys:resume(Dest, 500);
            1 -> sys:get_state(Dest, 500)
        end
    of
        R -> {breach, R}
    catch exit:{timeout, _} -> refused
    end;
attack(atom_flood, #{node := T}, _, _, I) ->
    %% Written by hand, so the fresh atoms are never created here either. The first and
    %% last name are kept for the test to look up on the target.
    {Names, Payload} = fresh_atoms_term(I),
    ok = inject(T, self(), ?INBOX, Payload),
    ets:insert(?TAB, {{fresh, T}, [hd(Names), lists:last(Names)]}),
    sent;
attack(spoof, #{node := T, victim := V}, Third, _, I) ->
    %% Claims to be a process of the target itself, then one of a third node.
    Msg = term_to_binary({soak_spoofed, I}),
    ok = inject(T, V, ?INBOX, Msg),
    ok = inject(T, Third, ?INBOX, Msg),
    sent;
attack(monitor_flood, #{victim := V}, _, _, _) ->
    N = 500,
    {P, Ref} = spawn_monitor(fun() ->
                                     _ = [monitor(process, V) || _ <- lists:seq(1, N)],
                                     exit(collect_downs(N, now_ms() + 5000, 0))
                             end),
    receive
        {'DOWN', Ref, process, P, N} -> refused;
        {'DOWN', Ref, process, P, Got} -> {breach, {noproc_downs, Got, of_, N}}
    after 10000 -> exit(P, kill), {breach, timeout}
    end;
attack(forged_exit, #{node := T, victim := V}, _, _, _) ->
    {?INBOX, T} ! {'EXIT', V, kill},
    {?INBOX, T} ! {'DOWN', make_ref(), process, V, kill},
    sent;
attack(link, #{victim := V}, _, _, _) ->
    %% Not trapping exits: the refused link comes back as a noproc link exit.
    {P, Ref} = spawn_monitor(fun() -> link(V), receive after 5000 -> linked end end),
    receive
        {'DOWN', Ref, process, P, noproc} -> refused;
        {'DOWN', Ref, process, P, Why} -> {breach, Why}
    after 10000 -> exit(P, kill), {breach, timeout}
    end;
attack(group_leader, #{victim := V}, _, _, _) ->
    group_leader(self(), V),
    sent.

collect_downs(0, _Deadline, Noproc) -> Noproc;
collect_downs(Left, Deadline, Noproc) ->
    receive
        {'DOWN', _, process, _, noproc} -> collect_downs(Left - 1, Deadline, Noproc + 1);
        {'DOWN', _, process, _, _} -> collect_downs(Left - 1, Deadline, Noproc)
    after max(0, Deadline - now_ms()) -> Noproc
    end.

%% A pid of Like's node with another number: <0.N.0> of that node.
guess_pid(Like, N) ->
    Bin = term_to_binary(Like),
    Size = byte_size(Bin) - 12,
    <<Head:Size/binary, _Id:32, _Serial:32, Creation:32>> = Bin,
    binary_to_term(<<Head/binary, N:32, 0:32, Creation:32>>).

%% {soak_spoofed, [100 fresh atoms]} in external term format, built without creating
%% the atoms. Node names are unique per run, so these names are new on every node.
fresh_atoms_term(I) ->
    Prefix = iolist_to_binary(["soak_fresh_", atom_to_list(node()), "_",
                               integer_to_list(I), "_"]),
    Atoms = [<<Prefix/binary, (integer_to_binary(J))/binary>> || J <- lists:seq(1, 100)],
    {Atoms,
     <<131, 104, 2, (existing(soak_spoofed))/binary,
       108, (length(Atoms)):32, << <<119, (byte_size(A)), A/binary>> || A <- Atoms >>/binary,
       106>>}.

existing(Atom) ->
    <<131, Ext/binary>> = term_to_binary(Atom),
    Ext.

%% One REG_SEND packet written by hand on the link to Node (see trust_dist_probe).
inject(Node, From, ToName, Payload) ->
    [Link] = [L || {N, L, _} <- trust_dist_server:links(), N =:= Node],
    Packet = <<112, (term_to_binary({6, From, '', ToName}))/binary, Payload/binary>>,
    trust_dist_nif:send(Link, [Packet]).
