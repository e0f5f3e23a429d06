%% The `make demo' scenario: my_desktop (tier admin) > ec2_node (worker) > bob_colo (edge),
%% three VMs on loopback over the trust_dist carrier. The desktop runs the scenario: it
%% drives both servers with ordinary OTP, has each server attack it (with code the server
%% already has: this module), checks on itself that nothing happened, then has ec2_node
%% drive bob_colo and bob_colo attack ec2_node, and prints each node's link counters.
%% Exits the VM with status 0 only if every expectation held.
%%
%% Every function below that takes part in a step runs on the node named in the step,
%% through erpc from the desktop (at/3): the desktop may do that, being the highest tier.
-module(trust_dist_demo).

-export([serve/1, run/1]).
%% Run on any node through at/3.
-export([ready/0, whoami/0, links/0, take_log/1, snapshot/0, await_sync/2, atoms_exist/2,
         victim_seen/0, drive/2, attack/3, allowed/3, dial/1]).
%% logger handler callback (the denial reports shown under the steps).
-export([log/2]).

-define(FLOOD_ATOMS, 10000).
-define(FLOOD_BATCH, 100).

%%% Servers (ec2_node, bob_colo)

%% Starts `results' and `victim' here, then runs until the desktop disconnects (it stops
%% the servers itself at the end; this is the backstop if the desktop dies).
serve(Desktop) ->
    setup_node(),
    ok = net_kernel:monitor_nodes(true, [{node_type, all}]),
    case lists:member(Desktop, nodes(connected)) of
        true -> ok;
        false -> receive {nodeup, Desktop, _} -> ok after 60000 -> halt(3) end
    end,
    receive {nodedown, Desktop, _} -> halt(0) end.

%% What every node of the demo has: the `results' server (what the policy exposes), a
%% `victim' that records every message it gets (what the policy does not expose), and a
%% capture of this node's trust_dist log lines.
setup_node() ->
    _ = demo_results:start(),
    case whereis(victim) of
        undefined ->
            Self = self(),
            spawn(fun() -> register(victim, self()), Self ! victim_up, victim_loop([]) end),
            receive victim_up -> ok after 5000 -> error(victim_not_started) end;
        _ -> ok
    end,
    capture_log().

victim_loop(Seen) ->
    receive
        {'$demo_seen', From} -> From ! {victim_seen, lists:reverse(Seen)}, victim_loop(Seen);
        Msg -> victim_loop([Msg | Seen])
    end.

ready() ->
    is_pid(whereis(results)) andalso is_pid(whereis(victim)) andalso is_pid(whereis(demo_log)).

%%% The desktop

run([Work, Ec2, Bob]) ->
    T0 = erlang:monotonic_time(millisecond),
    put(failed, 0),
    put(steps, 0),
    setup_node(),
    Desktop = node(),
    io:format("~ntrust_dist demo: ~s (tier admin) > ~s (tier worker) > ~s (tier edge)~n"
              "three VMs on loopback; the desktop runs the scenario and checks every effect~n",
              [short(Desktop), short(Ec2), short(Bob)]),
    case wait_up([Ec2, Bob], erlang:monotonic_time(millisecond) + 20000) of
        ok -> ok;
        {error, Node} ->
            io:format("~n  FAIL  ~s did not come up~n", [Node]),
            halt(1)
    end,
    io:format("policies (examples/demo/config/, read back from the running nodes):~n"),
    [io:format("  ~-11s ~ts~n", [short(N), policy_text(N)]) || N <- [Desktop, Ec2, Bob]],

    section("(a) my_desktop drives both servers with ordinary OTP (downward: full access)"),
    [drive_steps(Desktop, S) || S <- [Ec2, Bob]],
    step(io_lib:format("~s: send 64 MiB to ~s and check it arrived intact",
                       [short(Desktop), short(Ec2)]),
         fun() -> at(Desktop, drive, [bulk, Ec2]) end),

    section("(b) each server attacks my_desktop (upward: answer-only) - refused, effect checked"),
    [attack_steps(Attacker, Desktop, Work) || Attacker <- [Ec2, Bob]],

    section("(c) what my_desktop's policy allows still works"),
    allowed_steps(Ec2, Bob, Desktop),

    section("(d) ec2_node over bob_colo: the same rules one tier down"),
    step(io_lib:format("~s: net_adm:ping(~s) before ~s ever dialled it",
                       [short(Bob), short(Ec2), short(Ec2)]),
         Ec2,
         fun() ->
                 case at(Bob, dial, [Ec2]) of
                     {pang, Ms} ->
                         {ok, io_lib:format("pang after ~b ms: an edge node may not open "
                                            "connections to a worker (connect => false)", [Ms])};
                     {Other, _} -> {error, io_lib:format("~p", [Other])}
                 end
         end),
    drive_steps(Ec2, Bob),
    attack_steps(Bob, Ec2, Work),
    step(io_lib:format("~s: {results, ~s} ! {result, ...}   (allowlisted name)",
                       [short(Bob), short(Ec2)]),
         fun() -> allowed_send(Bob, Ec2) end),

    section("(e) per-link counters: trust_dist:links() on each node"),
    [print_links(N, Tier) || {N, Tier} <- [{Desktop, admin}, {Ec2, worker}, {Bob, edge}]],

    [catch erpc:call(S, init, stop, [], 2000) || S <- [Bob, Ec2]],
    Failed = get(failed),
    io:format("~n~b steps, ~b failed, ~.1f s~n",
              [get(steps), Failed, (erlang:monotonic_time(millisecond) - T0) / 1000]),
    halt(if Failed =:= 0 -> 0; true -> 1 end).

wait_up([], _Deadline) -> ok;
wait_up([Node | Rest] = Nodes, Deadline) ->
    Up = net_adm:ping(Node) =:= pong andalso (catch erpc:call(Node, ?MODULE, ready, [], 2000)) =:= true,
    case {Up, erlang:monotonic_time(millisecond) > Deadline} of
        {true, _} -> wait_up(Rest, Deadline);
        {false, true} -> {error, Node};
        {false, false} -> timer:sleep(100), wait_up(Nodes, Deadline)
    end.

%% Higher node From drives lower node To: plain distribution.
drive_steps(From, To) ->
    F = short(From), T = short(To),
    step(io_lib:format("~s: net_adm:ping(~s)", [F, T]), fun() -> at(From, drive, [ping, To]) end),
    step(io_lib:format("~s: erpc:call(~s, os, getpid, [])", [F, T]),
         fun() -> at(From, drive, [erpc, To]) end),
    step(io_lib:format("~s: spawn_link(~s, erlang, exit, [done_there])", [F, T]),
         fun() -> at(From, drive, [spawn_link, To]) end),
    step(io_lib:format("~s: monitor a process on ~s", [F, T]),
         fun() -> at(From, drive, [monitor, To]) end),
    step(io_lib:format("~s: gen_server:call({results, ~s}, count)", [F, T]),
         fun() -> at(From, drive, [call, To]) end),
    step(io_lib:format("~s: exit(Pid, kill) on a process of ~s", [F, T]),
         fun() -> at(From, drive, [kill, To]) end).

%% Lower node Attacker tries, against higher node Target, what a compromised server would.
%% Each attack ends with an allowed message to Target's `results' from the same process;
%% once it has arrived, every packet of the attack has been judged, and Target is
%% compared with the snapshot taken before.
attack_steps(Attacker, Target, Work) ->
    A = short(Attacker), T = short(Target),
    Creation = erpc:call(Target, erlang, system_info, [creation]),
    {VictimNumber, VictimSerial} =
        erpc:call(Target, ?MODULE, whoami, []),
    Guess = #{creation => Creation, victim => {VictimNumber, VictimSerial}},
    Marker = filename:join(Work, "pwned-by-" ++ A),
    attack_step(io_lib:format("~s: spawn(~s, file, write_file, [Marker, ...])", [A, T]),
                Attacker, Target, spawn, Guess#{marker => Marker ++ "-spawn"},
                fun({down, notsup}, Ms, #{marker := M}) ->
                        case filelib:is_file(M) of
                            false -> {ok, io_lib:format("DOWN notsup after ~b ms; no file written", [Ms])};
                            true -> {error, "the marker file was written: code ran"}
                        end;
                   (Other, _, _) -> {error, io_lib:format("~p", [Other])}
                end),
    attack_step(io_lib:format("~s: erpc:call(~s, os, cmd, [\"touch Marker\"])", [A, T]),
                Attacker, Target, erpc, Guess#{marker => Marker ++ "-erpc"},
                fun({erpc, notsup}, Ms, #{marker := M}) ->
                        case filelib:is_file(M) of
                            false -> {ok, io_lib:format("{erpc, notsup} after ~b ms; nothing ran", [Ms])};
                            true -> {error, "the marker file was written: code ran"}
                        end;
                   (Other, _, _) -> {error, io_lib:format("~p", [Other])}
                end),
    attack_step(io_lib:format("~s: exit(<guessed pid of victim>, kill)", [A]),
                Attacker, Target, exit, Guess,
                fun(sent, _Ms, _) -> {ok, "victim alive, same pid"} end),
    attack_step(io_lib:format("~s: {stop, stop} to init, by name and as <0.0.0>", [A]),
                Attacker, Target, init_stop, Guess,
                fun(sent, _Ms, _) -> {ok, "init still running"} end),
    attack_step(io_lib:format("~s: a message to a guessed pid and to {victim, ~s}", [A, T]),
                Attacker, Target, message, Guess,
                fun(sent, _Ms, _) -> {ok, "victim received nothing"} end),
    attack_step(io_lib:format("~s: sys:suspend({results, ~s}) via the allowlisted name", [A, T]),
                Attacker, Target, suspend, Guess,
                fun(timeout, Ms, _) ->
                        {ok, io_lib:format("timeout after ~b ms; results not suspended", [Ms])};
                   (Other, _, _) -> {error, io_lib:format("sys:suspend returned ~p", [Other])}
                end),
    attack_step(io_lib:format("~s: 10,000 fresh atoms in ~b messages to {results, ~s}",
                              [A, ?FLOOD_ATOMS div ?FLOOD_BATCH, T]),
                Attacker, Target, atom_flood, Guess,
                fun(sent, _Ms, _) -> {ok, "no message delivered"} end).

attack_step(Title, Attacker, Target, Kind, Args, Judge) ->
    step(Title, Target,
         fun() ->
                 Tag = erlang:unique_integer([positive]),
                 Before = at(Target, snapshot, []),
                 {Observed, Ms} = at(Attacker, attack, [Kind, Target, Args#{sync => Tag}]),
                 case at(Target, await_sync, [Tag, 5000]) of
                     true ->
                         After = at(Target, snapshot, []),
                         Changes = changes(Kind, Tag, Before, After) ++ flood_atoms(Kind, Target, Tag),
                         case {Judge(Observed, Ms, Args), Changes} of
                             {{ok, Detail}, []} ->
                                 {ok, [Detail, atoms_note(Kind, Before, After), "; ", short(Target), " unchanged"]};
                             {{ok, _}, _} -> {error, lists:join("; ", Changes)};
                             {Error, _} -> Error
                         end;
                     Other ->
                         {error, io_lib:format("the allowed message after the attack never arrived (~p): "
                                               "is ~s still serving?", [Other, short(Target)])}
                 end
         end).

atoms_note(atom_flood, #{atoms := A}, #{atoms := A}) ->
    io_lib:format("; none of them exists there; atom count ~b before and after", [A]);
atoms_note(_, _, _) -> "".

%% What an attack changed on Target, as readable complaints (none: unchanged). `results'
%% must hold exactly what it held plus the sync message; `victim' must be the same process,
%% having received nothing; init must still be running.
changes(Kind, Tag, Before, After) ->
    #{init := I0, victim := V0, victim_seen := S0, results := R0, results_seen := Seen0,
      results_status := St0, atoms := A0} = Before,
    #{init := I1, victim := V1, victim_seen := S1, results := R1, results_seen := Seen1,
      results_status := St1, atoms := A1} = After,
    Expected = Seen0 ++ [{info, {sync, Tag}}],
    [io_lib:format("init is ~p", [I1]) || I1 =/= I0]
        ++ [io_lib:format("victim was ~p, is ~p", [V0, V1]) || V1 =/= V0]
        ++ [io_lib:format("victim received ~p", [S1 -- S0]) || V1 =:= V0, S1 =/= S0]
        ++ [io_lib:format("results was ~p, is ~p", [R0, R1]) || R1 =/= R0]
        ++ [io_lib:format("results is ~p", [St1]) || St1 =/= St0]
        ++ [io_lib:format("results received ~P", [Seen1 -- Seen0, 8]) || Seen1 =/= Expected]
        ++ [io_lib:format("atom table grew by ~b", [A1 - A0]) || Kind =:= atom_flood, A1 =/= A0].

%% None of the flood's atoms may exist on Target. (The atom count is compared too, in
%% changes/4; this says whose atoms they would be.)
flood_atoms(atom_flood, Target, Tag) ->
    case at(Target, atoms_exist, [flood_prefix(Tag), lists:seq(0, ?FLOOD_ATOMS - 1)]) of
        [] -> [];
        Found -> [io_lib:format("~b of the attacker's atoms exist on ~s", [length(Found), short(Target)])]
    end;
flood_atoms(_, _, _) -> [].

%% What the desktop's policy lets the lower tiers do, and where it stops.
allowed_steps(Ec2, Bob, Desktop) ->
    E = short(Ec2), B = short(Bob), D = short(Desktop),
    step(io_lib:format("~s: {results, ~s} ! {result, ...}", [E, D]),
         fun() -> allowed_send(Ec2, Desktop) end),
    step(io_lib:format("~s: gen_server:call({results, ~s}, count)", [E, D]),
         fun() ->
                 case at(Ec2, allowed, [call, Desktop, none]) of
                     {count, Desktop, N} -> {ok, io_lib:format("{count, ~s, ~b}", [D, N])};
                     Other -> {error, io_lib:format("~p", [Other])}
                 end
         end),
    step(io_lib:format("~s: erpc:call(~s, demo_results, report, [R])  (allowlisted MFA)", [E, D]),
         fun() ->
                 Tag = erlang:unique_integer([positive]),
                 case at(Ec2, allowed, [report, Desktop, Tag]) of
                     {reported, Desktop, N} ->
                         case lists:member({report, {job, Tag}}, demo_results:seen()) of
                             true -> {ok, io_lib:format("{reported, ~s, ~b}; results holds it", [D, N])};
                             false -> {error, "results does not hold the report"}
                         end;
                     Other -> {error, io_lib:format("~p", [Other])}
                 end
         end),
    step(io_lib:format("~s: erpc:call(~s, demo_results, reset, [])  (same module, not listed)", [E, D]),
         Desktop,
         fun() ->
                 Before = length(demo_results:seen()),
                 case at(Ec2, allowed, [reset, Desktop, none]) of
                     {erpc, notsup} ->
                         case length(demo_results:seen()) of
                             Before -> {ok, "{erpc, notsup}; results not reset"};
                             _ -> {error, "results was reset"}
                         end;
                     Other -> {error, io_lib:format("~p", [Other])}
                 end
         end),
    step(io_lib:format("~s: {results, ~s} ! {result, ...}", [B, D]),
         fun() -> allowed_send(Bob, Desktop) end),
    step(io_lib:format("~s: erpc:call(~s, demo_results, report, [R])  (listed for worker only)", [B, D]),
         Desktop,
         fun() ->
                 case at(Bob, allowed, [report, Desktop, erlang:unique_integer([positive])]) of
                     {erpc, notsup} -> {ok, "{erpc, notsup}: edge has no rpc allowlist"};
                     Other -> {error, io_lib:format("~p", [Other])}
                 end
         end).

allowed_send(From, To) ->
    Tag = erlang:unique_integer([positive]),
    ok = at(From, allowed, [send, To, Tag]),
    case at(To, await_sync, [{result, Tag}, 3000]) of
        true -> {ok, "arrived in results"};
        Other -> {error, io_lib:format("not delivered (~p)", [Other])}
    end.

print_links(Node, Tier) ->
    Links = lists:sort(at(Node, links, [])),
    io:format("~n  on ~s (tier ~s):~n", [short(Node), Tier]),
    [print_link(L) || L <- Links],
    ok.

print_link({Peer, Tier, full, _Denied, _Counters}) ->
    io:format("    ~-11s ~-7s full        (plain distribution: nothing parsed, nothing counted)~n",
              [short(Peer), Tier]);
print_link({Peer, Tier, Mode, Denied, Counters}) ->
    io:format("    ~-11s ~-7s ~-11s refused ~b~n", [short(Peer), Tier, Mode, Denied]),
    Outcomes = [O || O <- [delivered, dropped, answered, closed, audited],
                     lists:any(fun({_, ByOutcome}) -> maps:is_key(O, ByOutcome) end, Counters)],
    io:format("        ~-24s~s~n", ["op", [io_lib:format("~10s", [O]) || O <- Outcomes]]),
    [io:format("        ~-24s~s~n",
               [Op, [io_lib:format("~10b", [maps:get(O, ByOutcome, 0)]) || O <- Outcomes]])
     || {Op, ByOutcome} <- Counters],
    ok.

policy_text(Node) ->
    case erpc:call(Node, application, get_env, [trust_dist, policy, #{}]) of
        Policy when map_size(Policy) =:= 0 -> "no policy: every peer is of a higher tier";
        Policy ->
            Tiers = erpc:call(Node, application, get_env, [trust_dist, tiers, []]),
            [lists:join("; ", [[atom_to_list(Tier), " may reach ", tier_policy(maps:get(Tier, Policy))]
                               || Tier <- Tiers, maps:is_key(Tier, Policy)]),
             "; nothing else"]
    end.

tier_policy(P) ->
    Names = [io_lib:format("~s", [N]) || N <- maps:get(registered, P, [])],
    Mfas = [io_lib:format("~s:~s/~b", [M, F, A]) || {M, F, A} <- maps:get(rpc, P, [])],
    lists:join(", ", Names ++ [["erpc ", Mfa] || Mfa <- Mfas]).

%%% Steps and output

section(Title) ->
    io:format("~n~s~n", [Title]).

step(Title, Fun) ->
    step(Title, none, Fun).

%% LogNode: the node whose trust_dist log lines (denials, refused connections) are shown
%% under the step.
step(Title, LogNode, Fun) ->
    _ = LogNode =/= none andalso at(LogNode, take_log, [0]),
    Result = try Fun() catch C:R:St -> {error, io_lib:format("~p:~0p ~0p", [C, R, hd(St)])} end,
    put(steps, get(steps) + 1),
    case Result of
        {ok, Detail} -> io:format("  ok    ~ts -> ~ts~n", [Title, Detail]);
        {error, Detail} ->
            put(failed, get(failed) + 1),
            io:format("  FAIL  ~ts -> ~ts~n", [Title, Detail])
    end,
    case LogNode of
        none -> ok;
        _ ->
            Lines = at(LogNode, take_log, [500]),
            {Show, Rest} = lists:split(min(2, length(Lines)), Lines),
            [io:format("          ~s log: ~ts~n", [short(LogNode), L]) || L <- Show],
            [io:format("          ~s log: ... and ~b more lines~n", [short(LogNode), length(Rest)])
             || Rest =/= []],
            [io:format("          ~s log: nothing (at most 10 reports per link and second; "
                       "the rest are counted)~n", [short(LogNode)]) || Lines =:= []],
            ok
    end.

%% Runs ?MODULE:F(Args...) on Node (erpc, also for this node: a fresh process each time).
at(Node, F, Args) ->
    erpc:call(Node, ?MODULE, F, Args, 20000).

short(Node) ->
    hd(string:split(atom_to_list(Node), "@")).

%%% Run on the node a step names

%% The number and serial of `victim' here (<0.N.S>): integers, not the pid, so a lower node
%% given them has still only guessed.
whoami() ->
    Pid = whereis(victim),
    [_, N, S] = string:lexemes(pid_to_list(Pid), "<.>"),
    {list_to_integer(N), list_to_integer(S)}.

links() ->
    [{maps:get(node, L), to_list(maps:get(tier, L)), maps:get(mode, L), maps:get(denied, L, 0),
      lists:sort(maps:to_list(maps:get(counters, L, #{})))}
     || L <- trust_dist:links()].

to_list(A) when is_atom(A) -> atom_to_list(A);
to_list(B) when is_binary(B) -> binary_to_list(B);
to_list(L) -> L.

snapshot() ->
    Results = whereis(results),
    #{init => init:get_status(),
      victim => whereis(victim),
      victim_seen => victim_seen(),
      results => Results,
      results_status => results_status(Results),
      results_seen => demo_results:seen(),
      atoms => erlang:system_info(atom_count)}.

results_status(Pid) ->
    try sys:get_status(Pid, 1000) of
        {status, Pid, _, [_, Status | _]} -> Status
    catch _:_ -> unavailable
    end.

victim_seen() ->
    victim ! {'$demo_seen', self()},
    receive {victim_seen, Seen} -> Seen after 2000 -> timeout end.

%% Waits until `results' here has received {sync, Tag} (or Tag itself, if a tuple).
await_sync(Tag, Ms) ->
    Entry = case Tag of
                T when is_integer(T) -> {info, {sync, T}};
                T -> {info, T}
            end,
    await(Entry, erlang:monotonic_time(millisecond) + Ms).

await(Entry, Deadline) ->
    case lists:member(Entry, demo_results:seen()) of
        true -> true;
        false ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> false;
                false -> timer:sleep(10), await(Entry, Deadline)
            end
    end.

atoms_exist(Prefix, Numbers) ->
    [N || N <- Numbers,
          try list_to_existing_atom(Prefix ++ integer_to_list(N)) of _ -> true
          catch error:badarg -> false end].

flood_prefix(Tag) ->
    "demo_fresh_" ++ integer_to_list(Tag) ++ "_".

dial(Node) ->
    T0 = erlang:monotonic_time(millisecond),
    R = net_adm:ping(Node),
    {R, erlang:monotonic_time(millisecond) - T0}.

%% Downward: what a higher node does to a lower one.
drive(ping, To) ->
    case net_adm:ping(To) of
        pong ->
            case [L || {N, _, _, _, _} = L <- links(), N =:= To] of
                [{_, Tier, Mode, _, _}] ->
                    Hidden = case lists:member(To, nodes(hidden)) of true -> "hidden"; false -> "visible" end,
                    {ok, io_lib:format("pong; ~s link, ~s on this side (peer tier ~s)",
                                       [Hidden, Mode, Tier])};
                _ -> {error, "pong, but no trust_dist link"}
            end;
        pang -> {error, "pang"}
    end;
drive(erpc, To) ->
    OsPid = erpc:call(To, os, getpid, [], 5000),
    Release = erpc:call(To, erlang, system_info, [otp_release], 5000),
    {ok, io_lib:format("~s (its own VM; OTP ~s)", [OsPid, Release])};
drive(spawn_link, To) ->
    process_flag(trap_exit, true),
    Pid = spawn_link(To, erlang, exit, [done_there]),
    receive {'EXIT', Pid, Why} when Why =:= done_there -> {ok, "EXIT done_there"}
    after 5000 -> {error, "no EXIT"}
    end;
drive(monitor, To) ->
    Pid = spawn(To, timer, sleep, [50]),
    Ref = monitor(process, Pid),
    receive {'DOWN', Ref, process, Pid, normal} -> {ok, "DOWN normal"}
    after 5000 -> {error, "no DOWN"}
    end;
drive(call, To) ->
    case gen_server:call({results, To}, count, 5000) of
        {count, To, N} -> {ok, io_lib:format("{count, ~s, ~b}", [short(To), N])};
        Other -> {error, io_lib:format("~p", [Other])}
    end;
drive(kill, To) ->
    Pid = spawn(To, timer, sleep, [infinity]),
    Ref = monitor(process, Pid),
    exit(Pid, kill),
    receive {'DOWN', Ref, process, Pid, killed} -> {ok, "DOWN killed"}
    after 5000 -> {error, "no DOWN"}
    end;
drive(bulk, To) ->
    Bin = binary:copy(crypto:strong_rand_bytes(1024 * 1024), 64),
    T0 = erlang:monotonic_time(millisecond),
    Hash = erpc:call(To, crypto, hash, [sha256, Bin], 60000),
    Ms = max(1, erlang:monotonic_time(millisecond) - T0),
    case Hash =:= crypto:hash(sha256, Bin) of
        true -> {ok, io_lib:format("64 MiB in ~b ms, SHA-256 matches", [Ms])};
        false -> {error, "SHA-256 differs"}
    end.

%% The steps run in processes the desktop spawned, whose group leader is the desktop's:
%% what they log would go there. An attacker acts on its own: use this node's.
on_its_own() ->
    group_leader(whereis(user), self()).

%% Upward, allowed by the policy (run on the lower node).
allowed(Kind, To, Tag) ->
    on_its_own(),
    allowed_(Kind, To, Tag).

allowed_(send, To, Tag) ->
    {results, To} ! {result, Tag},
    ok;
allowed_(call, To, _) ->
    gen_server:call({results, To}, count, 3000);
allowed_(report, To, Tag) ->
    try erpc:call(To, demo_results, report, [{job, Tag}], 3000) catch error:E -> E end;
allowed_(reset, To, _) ->
    try erpc:call(To, demo_results, reset, [], 3000) catch error:E -> E end.

%% Upward attacks (run on the lower node). Returns {Observed, Ms}; the last message is the
%% sync to Target's `results'.
attack(Kind, Target, #{sync := Tag} = Args) ->
    on_its_own(),
    T0 = erlang:monotonic_time(millisecond),
    Observed = attack_(Kind, Target, Args),
    Ms = erlang:monotonic_time(millisecond) - T0,
    {results, Target} ! {sync, Tag},
    {Observed, Ms}.

attack_(spawn, Target, #{marker := Path}) ->
    Pid = spawn(Target, file, write_file, [Path, <<"pwned">>]),
    Ref = monitor(process, Pid),
    receive {'DOWN', Ref, process, Pid, Why} -> {down, Why}
    after 3000 -> demonitor(Ref, [flush]), still_running
    end;
attack_(erpc, Target, #{marker := Path}) ->
    try erpc:call(Target, os, cmd, ["touch " ++ Path], 3000) catch error:E -> E end;
attack_(exit, Target, #{creation := C, victim := {N, S}}) ->
    exit(guess_pid(Target, C, N, S), kill),
    sent;
attack_(init_stop, Target, #{creation := C}) ->
    {init, Target} ! {stop, stop},
    guess_pid(Target, C, 0, 0) ! {stop, stop},
    sent;
attack_(message, Target, #{creation := C, victim := {N, S}}) ->
    guess_pid(Target, C, N, S) ! {result, guessed},
    {victim, Target} ! {result, by_name},
    sent;
attack_(suspend, Target, _) ->
    try sys:suspend({results, Target}, 500) of
        ok -> suspended
    catch exit:{timeout, _} -> timeout
    end;
attack_(atom_flood, Target, #{sync := Tag}) ->
    Prefix = flood_prefix(Tag),
    [{results, Target} ! {atoms, [list_to_atom(Prefix ++ integer_to_list(I))
                                  || I <- lists:seq(B, B + ?FLOOD_BATCH - 1)]}
     || B <- lists:seq(0, ?FLOOD_ATOMS - 1, ?FLOOD_BATCH)],
    sent.

%% A pid of Node that nobody handed us: its node name and creation are public (any pid of
%% that node shows them), its number is guessed.
guess_pid(Node, Creation, Number, Serial) ->
    Name = atom_to_binary(Node, utf8),
    binary_to_term(<<131, 88, 119, (byte_size(Name)), Name/binary,
                     Number:32, Serial:32, Creation:32>>).

%%% This node's trust_dist log lines, kept for the steps to show

capture_log() ->
    case whereis(demo_log) of
        undefined ->
            register(demo_log, spawn(fun() -> log_store([]) end)),
            ok = logger:add_handler(demo_log, ?MODULE,
                                    #{level => all, filter_default => stop,
                                      filters => [{trust_dist, {fun logger_filters:domain/2,
                                                                {log, sub, [trust_dist]}}}]});
        _ -> ok
    end.

log_store(Lines) ->
    receive
        {line, L} -> log_store([L | Lines]);
        {take, From} -> From ! {lines, lists:reverse(Lines)}, log_store([])
    end.

%% The lines logged since the last call; waits up to WaitMs for a first one.
take_log(WaitMs) ->
    Deadline = erlang:monotonic_time(millisecond) + WaitMs,
    take_log_until(Deadline).

take_log_until(Deadline) ->
    demo_log ! {take, self()},
    Lines = receive {lines, L} -> L end,
    case Lines =:= [] andalso erlang:monotonic_time(millisecond) < Deadline of
        true -> timer:sleep(20), take_log_until(Deadline);
        false ->
            %% A refusal often comes with a second one (both halves of an attack).
            timer:sleep(20),
            demo_log ! {take, self()},
            receive {lines, More} -> Lines ++ More end
    end.

log(#{msg := Msg}, _Config) ->
    Text = case Msg of
               {report, #{what := trust_dist_denied} = R} -> denial(R);
               {report, R} -> io_lib:format("~0tp", [R]);
               {string, S} -> S;
               {Format, Args} -> io_lib:format(Format, Args)
           end,
    Line = case unicode:characters_to_binary(Text) of
               <<"trust_dist: ", Rest/binary>> -> Rest;
               Bin -> Bin
           end,
    catch demo_log ! {line, Line},
    ok.

denial(#{peer := Peer, tier := Tier, op := Op, reason := Reason, outcome := Outcome} = R) ->
    More = case maps:get(suppressed, R, 0) of
               0 -> "";
               N -> io_lib:format(" (+~b not logged)", [N])
           end,
    io_lib:format("refused ~s from ~s (~s): ~s (~ts), ~s~s",
                  [Op, short(Peer), Tier, Reason, maps:get(detail, R, ""), Outcome, More]).
