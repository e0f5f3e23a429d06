%% @doc Distribution carrier benchmark: the same workload over `inet_tcp_dist',
%% `inet_tls_dist' and `trust_dist', on loopback, side by side.
%%
%% Run through `bench/run.sh' (which compiles this module into a temporary directory):
%%
%%   bench/run.sh [--quick] [--carriers inet_tcp,inet_tls,trust] [--no-loss | --loss-only]
%%                [--out DIR] [--keep]
%%
%% The orchestrator (this module's main/1) is NOT distributed. Every node pair is two
%% fresh BEAM nodes started with `peer' using `connection => standard_io', and driven with
%% `peer:call/5'; the workloads run on node A and talk to processes on node B over the
%% carrier under test. The loss rows run the ping-under-load workload once more with A
%% and B in two network namespaces joined by an impaired wire (scripts/faults-net.sh).
%% See bench/README.md for what each metric measures.
-module(dist_bench).

-include_lib("public_key/include/public_key.hrl").

%% orchestrator
-export([main/1]).
%% run on the benchmark nodes
-export([connect/2, rtt/4, throughput/6, rate/6, load_ping/6,
         echo/0, echo_stamped/0, sink/0, os_pid/0]).

-define(CARRIERS, [inet_tcp, inet_tls, trust, trust_restricted, raw_quinn]).
%% The carriers of the loss rows: the anchor and trust's two link modes. inet_tls would
%% need certificates for the namespaces' addresses, and raw quinn has no pinger.
-define(LOSS_CARRIERS, [inet_tcp, trust, trust_restricted]).
%% trust-dist-wire's impairment, each way: 25 ms makes a 50 ms round trip.
-define(LOSS_WIRE, ["--delay-ms", "25", "--loss", "1"]).
%% Inside the namespaces each node is alone, so every node listens on this one port, and
%% no EPMD is needed (or left running) there.
-define(LOSS_PORT, 4370).
-define(STARVE_MS, 10000).
-define(KIB, 1024).
-define(MIB, (1024 * 1024)).
-define(GIB, (1024 * 1024 * 1024)).

%%%===================================================================
%%% Orchestrator
%%%===================================================================

main(Args) ->
    Start = erlang:monotonic_time(millisecond),
    Opts = try check_args(parse_args(Args, defaults()))
           catch throw:{usage, Msg} ->
                   io:format(standard_error, "dist_bench: ~ts~n~ts", [Msg, usage()]),
                   halt(64)
           end,
    ok = io:setopts(standard_io, [{encoding, unicode}]),
    put(peers, []),
    Code = try run(Opts, Start) of
               ok -> 0
           catch Class:Reason:St ->
                   io:format(standard_error, "dist_bench: aborted: ~p:~p~n~p~n",
                             [Class, Reason, St]),
                   2
           after
               stop_all_peers(),
               maybe_cleanup(Opts)
           end,
    log("total run time ~.1f s", [(erlang:monotonic_time(millisecond) - Start) / 1000]),
    halt(Code).

usage() ->
    "usage: bench/run.sh [--quick] [--carriers inet_tcp,inet_tls,trust,trust_restricted,raw_quinn] "
    "[--no-loss | --loss-only] [--out DIR] [--ebin TRUST_EBIN] [--cli TRUST_DIST_CLI] [--tmp DIR] [--keep]\n".

defaults() ->
    Root = repo_root(),
    #{carriers => ?CARRIERS,
      quick => false,
      keep => false,
      loss => true,
      root => Root,
      out => filename:join([Root, "bench", "results"]),
      ebin => filename:join([Root, "_build", "dev", "lib", "trust_dist", "ebin"]),
      cli => filename:join([Root, "bin", "trust-dist"])}.

%% bench/run.sh exports DIST_BENCH_ROOT; fall back to the current directory.
repo_root() ->
    case os:getenv("DIST_BENCH_ROOT") of
        false -> {ok, Cwd} = file:get_cwd(), Cwd;
        Dir -> Dir
    end.

parse_args([], Opts) -> Opts;
parse_args(["--quick" | T], Opts) -> parse_args(T, Opts#{quick := true});
parse_args(["--keep" | T], Opts) -> parse_args(T, Opts#{keep := true});
parse_args(["--no-loss" | T], Opts) -> parse_args(T, Opts#{loss := false});
parse_args(["--loss-only" | T], Opts) -> parse_args(T, Opts#{loss_only => true});
parse_args(["--carriers", L | T], Opts) -> parse_args(T, Opts#{carriers := carriers(L)});
parse_args(["--carriers=" ++ L | T], Opts) -> parse_args(T, Opts#{carriers := carriers(L)});
parse_args(["--out", D | T], Opts) -> parse_args(T, Opts#{out := D});
parse_args(["--ebin", D | T], Opts) -> parse_args(T, Opts#{ebin := D});
parse_args(["--cli", D | T], Opts) -> parse_args(T, Opts#{cli := D});
parse_args(["--tmp", D | T], Opts) -> parse_args(T, Opts#{tmp_dir => D});
parse_args(["-h" | _], _) -> throw({usage, "help"});
parse_args(["--help" | _], _) -> throw({usage, "help"});
parse_args([Other | _], _) -> throw({usage, "unknown argument " ++ Other}).

check_args(#{loss_only := true, loss := false}) ->
    throw({usage, "--loss-only and --no-loss leave nothing to run"});
check_args(Opts) ->
    Opts.

carriers(List) ->
    Cs = [carrier(string:trim(C)) || C <- string:lexemes(List, ","), string:trim(C) =/= ""],
    Cs =:= [] andalso throw({usage, "--carriers needs at least one carrier"}),
    %% keep the canonical column order
    [C || C <- ?CARRIERS, lists:member(C, Cs)].

carrier(C) when C =:= "inet_tcp"; C =:= "tcp"; C =:= "inet_tcp_dist" -> inet_tcp;
carrier(C) when C =:= "inet_tls"; C =:= "tls"; C =:= "inet_tls_dist" -> inet_tls;
carrier(C) when C =:= "trust"; C =:= "trust_dist"; C =:= "quic" -> trust;
carrier(C) when C =:= "trust_restricted"; C =:= "restricted" -> trust_restricted;
carrier(C) when C =:= "raw_quinn"; C =:= "quinn"; C =:= "raw" -> raw_quinn;
carrier(C) -> throw({usage, "unknown carrier " ++ C ++
                         " (use inet_tcp, inet_tls, trust, trust_restricted)"}).

%% Workload sizes. `full' targets >= 2 s per throughput case (3 s used) and a whole run
%% of about 2 minutes for the three carriers; `quick' is a < 1 minute smoke test.
params(#{quick := false}) ->
    #{rtt_warm => 2000, rtt_n => 20000,
      %% Throughput figures are the median of three runs: one 3 s run moved by +-20 %
      %% between runs on the 2-core development machine.
      tput_ms => 3000, tput_max => 4 * ?GIB, tput_runs => 3,
      rate_ms => 3000, rate_senders => 4,
      load_ms => 5000,
      %% at 50 ms RTT sequential pings come 20 a second at most, fewer behind the bulk
      %% (inet_tcp: about 7): 20 s gives a p99 over 100-400 samples and keeps the three
      %% loss rows under 2 minutes. The warm-up only proves the link before the bulk
      %% starts; the lead gives the bulk sender's congestion window 20 round trips.
      loss_ms => 20000, loss_warm => 20, loss_lead_ms => 1000,
      setup_pairs => 5, reconnects => 5,
      wait_ms => 20000, disconnect_wait_ms => 10000};
params(#{quick := true}) ->
    #{rtt_warm => 200, rtt_n => 2000,
      tput_ms => 500, tput_max => 1 * ?GIB, tput_runs => 1,
      rate_ms => 500, rate_senders => 4,
      load_ms => 1000,
      loss_ms => 4000, loss_warm => 10, loss_lead_ms => 500,
      setup_pairs => 2, reconnects => 2,
      wait_ms => 10000, disconnect_wait_ms => 5000}.

run(#{carriers := Carriers, quick := Quick} = Opts0, Start) ->
    Tmp = make_tmp(Opts0),
    Load0 = loadavg(),
    Load0 >= 0.5 andalso
        log("WARNING: load average ~.2f before the run: other work on this machine will "
            "make the numbers noisy", [Load0]),
    Opts = Opts0#{tmp => Tmp, params => params(Opts0), load_before => Load0,
                  bench_ebin => filename:dirname(code:which(?MODULE)),
                  clk_tck => clk_tck(), tag => "db" ++ os:getpid()},
    put(opts, Opts),
    log("carriers ~p, mode ~s, temp dir ~ts", [Carriers, mode(Quick), Tmp]),
    Results0 = case Opts of
                   %% the loopback cells read n/a; for iterating on the loss rows alone
                   #{loss_only := true} ->
                       [{C, maps:from_list([{K, {ok, #{}}} || K <- metric_keys()])}
                        || C <- Carriers];
                   _ ->
                       [{C, bench_carrier(C, Opts)} || C <- Carriers]
               end,
    Results = loss_rows(Results0, Opts),
    Elapsed = (erlang:monotonic_time(millisecond) - Start) / 1000,
    Meta = meta(Opts, Elapsed),
    Table = render_markdown(Results, Meta),
    io:format("~n~ts~n", [Table]),
    write_results(Opts, Table, Results, Meta),
    ok.

mode(true) -> "quick";
mode(false) -> "full".

make_tmp(#{tmp_dir := Dir}) ->
    ok = filelib:ensure_path(Dir),
    Dir;
make_tmp(_) ->
    Base = case os:getenv("TMPDIR") of false -> "/tmp"; "" -> "/tmp"; T -> T end,
    Dir = filename:join(Base, "dist_bench." ++ os:getpid()),
    _ = file:del_dir_r(Dir),
    ok = filelib:ensure_path(Dir),
    Dir.

maybe_cleanup(Opts) ->
    case get(opts) of
        #{tmp := Tmp, keep := false} -> _ = file:del_dir_r(Tmp), ok;
        #{tmp := Tmp} -> log("kept temp dir ~ts", [Tmp]);
        _ -> _ = Opts, ok
    end.

clk_tck() ->
    case string:to_integer(string:trim(os:cmd("getconf CLK_TCK 2>/dev/null"))) of
        {N, ""} when is_integer(N), N > 0 -> N;
        _ -> 100
    end.

%%% One carrier: prepare, main pair (metrics 1-4, 6, reconnect), then fresh pairs (5).

bench_carrier(raw_quinn, Opts) ->
    log("=== raw_quinn ===", []),
    raw_quinn(Opts);
bench_carrier(Carrier, Opts) ->
    log("=== ~s ===", [Carrier]),
    T0 = erlang:monotonic_time(millisecond),
    R = try prepare(Carrier, Opts) of
            Ctx -> bench_with(Carrier, Ctx)
        catch Class:Reason:St ->
                Text = fmt("~s preparation failed: ~p:~0p", [Carrier, Class, Reason]),
                log("~ts~n~p", [Text, St]),
                maps:from_list([{K, {error, Text}} || K <- metric_keys()])
        end,
    log("~s done in ~.1f s", [Carrier, (erlang:monotonic_time(millisecond) - T0) / 1000]),
    R.

metric_keys() ->
    [rtt, tput_64k, tput_1m, rate_100b, load_ping, loss_ping, setup, reconnect].

bench_with(Carrier, Ctx) ->
    #{params := P, clk_tck := Tck} = Ctx,
    Pair0 = start_pair(Ctx, "m"),
    Steps =
        [{rtt, fun(#{a := A, b := B}) ->
                       N = maps:get(rtt_n, P),
                       call(A, rtt, [node_of(B), maps:get(rtt_warm, P), N, ?STARVE_MS],
                            budget(rtt, N))
               end},
         {tput_64k, fun(Pair) -> tput(Pair, 64 * ?KIB, P, Tck) end},
         {tput_1m, fun(Pair) -> tput(Pair, ?MIB, P, Tck) end},
         {rate_100b, fun(#{a := A, b := B}) ->
                             Ms = maps:get(rate_ms, P),
                             W = maps:get(wait_ms, P),
                             call(A, rate, [node_of(B), os_pid_of(B), maps:get(rate_senders, P), 100, Ms, W],
                                  budget(rate, {Ms, W}))
                     end},
         {load_ping, fun(#{a := A, b := B}) ->
                             Ms = maps:get(load_ms, P),
                             W = maps:get(wait_ms, P),
                             call(A, load_ping, [node_of(B), ?MIB, Ms, ?STARVE_MS, W,
                                                 #{warm => 200, lead_ms => min(300, Ms div 5)}],
                                  budget(load_ping, {Ms, ?STARVE_MS, W}))
                     end},
         {reconnect, fun(Pair) -> reconnects(Pair, maps:get(reconnects, P)) end}],
    Link = case Pair0 of
               #{connect := #{ms := Ms, info := LinkInfo}} ->
                   log("~s main pair connected in ~.1f ms", [Carrier, float(Ms)]),
                   %% A's view: full either way (in the restricted pair A is the lower
                   %% node; B filters everything A sends).
                   [log("WARNING: trust link mode is ~p, not full", [Mode])
                    || #{mode := Mode} <- LinkInfo, Mode =/= full],
                   {ok, #{first_connect_ms => Ms, link_info => LinkInfo}};
               {error, Why} ->
                   log("~s main pair FAILED: ~ts", [Carrier, Why]),
                   {error, Why}
           end,
    {Results, PairN} = run_steps(Carrier, Ctx, Steps, Pair0, #{}),
    stop_pair(PairN),
    Setup = setup_pairs(Carrier, Ctx, maps:get(setup_pairs, P)),
    Results#{setup => Setup, link => Link}.

%% The median of `tput_runs' runs by rate (its CPU figures with it); every run's rate is
%% kept as `runs_mb_per_s'. A failed run fails the metric.
tput(#{a := A, b := B}, Size, P, Tck) ->
    Ms = maps:get(tput_ms, P),
    W = maps:get(wait_ms, P),
    Run = fun() ->
                  call(A, throughput, [node_of(B), os_pid_of(B), Size, {Ms, W},
                                       maps:get(tput_max, P), Tck],
                       budget(throughput, {Ms, W}))
          end,
    median_run(Run, maps:get(tput_runs, P), []).

median_run(_Run, 0, Runs) ->
    Sorted = lists:sort(fun(X, Y) -> maps:get(mb_per_s, X) =< maps:get(mb_per_s, Y) end, Runs),
    Median = lists:nth((length(Sorted) + 1) div 2, Sorted),
    {ok, Median#{runs_mb_per_s => [maps:get(mb_per_s, R) || R <- lists:reverse(Runs)]}};
median_run(Run, N, Runs) ->
    case Run() of
        {ok, R} -> median_run(Run, N - 1, [R | Runs]);
        Other -> Other
    end.

%% How long a node-side workload may run before it is killed (it then reports an error);
%% the orchestrator's peer:call waits 15 s longer, so the node always answers first.
budget(rtt, N) -> 30000 + N * 2;
budget(throughput, {Ms, W}) -> Ms + 2 * W + 5000;
budget(rate, {Ms, W}) -> Ms + 3 * W + 5000;
budget(load_ping, {Ms, Starve, W}) -> Ms + 2 * Starve + 3 * W + 5000.

%% Runs each step on the pair; a failed step (exception, timeout, dead link) is recorded
%% for that metric only, and the pair is replaced by a fresh one for the next step.
run_steps(_Carrier, _Ctx, [], Pair, Acc) ->
    {Acc, Pair};
run_steps(Carrier, Ctx, [{Key, Fun} | Rest], Pair, Acc) ->
    T0 = erlang:monotonic_time(millisecond),
    Result = case Pair of
                 {error, Why} ->
                     {error, fmt("no node pair: ~ts", [Why])};
                 _ ->
                     try Fun(Pair) of
                         {ok, _} = Ok -> Ok;
                         {error, _} = E -> E;
                         Other -> {error, fmt("unexpected result ~0p", [Other])}
                     catch Class:Reason ->
                             {error, fmt("~p:~0p", [Class, Reason])}
                     end
             end,
    log("~s ~s: ~ts (~.1f s)", [Carrier, Key, brief(Key, Result),
                                (erlang:monotonic_time(millisecond) - T0) / 1000]),
    Pair1 = case Result of
                {ok, _} -> Pair;
                {error, _} when Rest =/= [], is_map(Pair) ->
                    log("~s: restarting the node pair after the failure", [Carrier]),
                    stop_pair(Pair),
                    start_pair(Ctx, "m");
                {error, _} -> Pair
            end,
    run_steps(Carrier, Ctx, Rest, Pair1, Acc#{Key => Result}).

%% Metric 5: fresh pairs, time `net_kernel:connect_node/1' from A.
setup_pairs(Carrier, Ctx, N) ->
    Samples = setup_samples(Carrier, Ctx, 1, N, 0),
    Ok = [Ms || {ok, Ms} <- Samples],
    Errors = [E || {error, E} <- Samples],
    R = case Ok of
            [] -> {error, fmt("fresh-pair connects failed (~b tried): ~ts", [length(Errors), hd(Errors)])};
            _ ->
                {ok, #{median_ms => median(Ok), samples_ms => Ok, pairs => N,
                       failures => [list_to_binary(E) || E <- Errors],
                       method => <<"fresh node pair per sample">>}}
        end,
    log("~s setup: ~ts", [Carrier, brief(setup, R)]),
    R.

%% Gives up after two failures in a row (a broken carrier would otherwise cost N timeouts).
setup_samples(_Carrier, _Ctx, I, N, _Fails) when I > N -> [];
setup_samples(_Carrier, _Ctx, _I, _N, 2) -> [];
setup_samples(Carrier, Ctx, I, N, Fails) ->
    case setup_once(Carrier, Ctx, I) of
        {ok, _} = R -> [R | setup_samples(Carrier, Ctx, I + 1, N, 0)];
        {error, _} = E -> [E | setup_samples(Carrier, Ctx, I + 1, N, Fails + 1)]
    end.

setup_once(_Carrier, Ctx, I) ->
    Slot = "s" ++ integer_to_list(I),
    case start_pair_noconnect(Ctx, Slot) of
        {error, Why} ->
            {error, Why};
        #{a := A, b := B} = Pair ->
            R = try call(A, connect, [node_of(B), 30000], 30000) of
                    {ok, #{ms := Ms}} -> {ok, Ms};
                    {error, E} -> {error, fmt("~ts", [E])}
                catch C:W -> {error, fmt("~p:~0p", [C, W])}
                end,
            stop_pair(Pair),
            R
    end.

%% Extra row: disconnect + connect on the already-warm main pair.
reconnects(Pair, N) ->
    reconnects(Pair, N, []).

reconnects(_Pair, 0, Ms) ->
    {ok, #{median_ms => median(Ms), samples_ms => lists:reverse(Ms)}};
reconnects(Pair, N, Ms) ->
    case reconnect_once(Pair) of
        {ok, M} -> reconnects(Pair, N - 1, [M | Ms]);
        {error, E} -> {error, fmt("cycle ~b: ~ts", [length(Ms) + 1, E])}
    end.

reconnect_once(#{a := A, b := B}) ->
    NB = node_of(B),
    Connected = fun(X, Other) ->
                        lists:member(node_of(Other),
                                     peer:call(peer_of(X), erlang, nodes, [connected], 5000))
                end,
    _ = peer:call(peer_of(A), erlang, disconnect_node, [NB], 10000),
    Wait = maps:get(disconnect_wait_ms, maps:get(params, get(opts))),
    case wait_until(fun() -> not Connected(A, B) andalso not Connected(B, A) end, Wait) of
        timeout ->
            {error, fmt("after erlang:disconnect_node(B) on A, still connected after ~b ms: "
                        "A lists B: ~p, B lists A: ~p",
                        [Wait, Connected(A, B), Connected(B, A)])};
        ok ->
            case call(A, connect, [NB, 30000], 30000) of
                {ok, #{ms := Ms}} -> {ok, Ms};
                {error, E} -> {error, fmt("reconnect: ~ts", [E])}
            end
    end.

wait_until(Fun, Ms) ->
    Deadline = erlang:monotonic_time(millisecond) + Ms,
    wait_until1(Fun, Deadline).

wait_until1(Fun, Deadline) ->
    case Fun() of
        true -> ok;
        false ->
            case erlang:monotonic_time(millisecond) >= Deadline of
                true -> timeout;
                false -> timer:sleep(20), wait_until1(Fun, Deadline)
            end
    end.

%%% The loss rows: the ping-under-load workload once more, with A and B in two network
%%% namespaces joined by trust-dist-wire, 25 ms delay and 1 % loss each way. The kernel
%%% has no netem; scripts/faults-net.sh is the project's impaired link (`make faults'
%%% uses it too). Each carrier gets fresh namespaces and a fresh wire, so the wire's
%%% counters in its result are that carrier's alone.

loss_rows(Results, #{loss := Loss} = Opts) ->
    Wanted = [C || {C, _} <- Results, lists:member(C, ?LOSS_CARRIERS)],
    Ready = if Wanted =:= [] -> none;
               not Loss -> {na, "--no-loss", "skipped with --no-loss"};
               true -> loss_check(Opts)
            end,
    [{C, R#{loss_ping => case lists:member(C, Wanted) of
                              false -> {ok, #{}};
                              true -> loss_row(C, Ready, Opts)
                          end}}
     || {C, R} <- Results].

loss_row(_Carrier, {na, Short, Why}, _Opts) ->
    {ok, #{na => list_to_binary(Short), na_reason => unicode:characters_to_binary(Why)}};
loss_row(Carrier, ok, Opts) ->
    bench_loss(Carrier, Opts).

%% Root, network namespaces and veth: asked once, so a machine without them costs one
%% short command and every loss cell says why it is empty.
loss_check(Opts) ->
    case run_cmd(shell_quote(faults_net(Opts)) ++ " check") of
        {0, _} -> ok;
        {_, Out} ->
            Why = string:trim(binary_to_list(Out)),
            log("loss rows not measured: ~ts", [Why]),
            {na, loss_na(Why), Why}
    end.

faults_net(#{root := Root}) -> filename:join([Root, "scripts", "faults-net.sh"]).

%% A cell-sized reason from faults-net.sh's message; the whole message goes under the
%% table and into the JSON.
loss_na(Why) ->
    Has = fun(S) -> string:find(Why, S) =/= nomatch end,
    case Has("needs root") of
        true -> "needs root";
        false ->
            case Has("not built") of
                true -> "wire not built";
                false -> "no netns"
            end
    end.

bench_loss(Carrier, Opts) ->
    log("=== ~s, 1 % loss and 50 ms RTT (network namespaces) ===", [Carrier]),
    T0 = erlang:monotonic_time(millisecond),
    R = case loss_net_open(Opts) of
            {na, Short, Why} ->
                log("loss rows not measured: ~ts", [Why]),
                {ok, #{na => list_to_binary(Short), na_reason => unicode:characters_to_binary(Why)}};
            {error, _} = E ->
                E;
            {ok, Net} ->
                %% whatever happens to the pair, the namespaces go
                Result = try loss_pair(Carrier, Opts, Net)
                         catch Class:Reason:St ->
                                 log("~s loss pair: ~p:~0p~n~p", [Carrier, Class, Reason, St]),
                                 {error, fmt("~p:~0p", [Class, Reason])}
                         end,
                Wire = loss_net_close(Net),
                log("~s wire: ~ts", [Carrier, wire_brief(Wire)]),
                case Result of
                    {ok, M} -> {ok, M#{wire => Wire}};
                    Error -> Error
                end
        end,
    log("~s loss_ping: ~ts (~.1f s)", [Carrier, brief(loss_ping, R),
                                       (erlang:monotonic_time(millisecond) - T0) / 1000]),
    R.

loss_pair(Carrier, #{params := P} = Opts, Net) ->
    Ctx = loss_prepare(Carrier, Opts, Net),
    case start_pair(Ctx, "l") of
        {error, Why} ->
            {error, fmt("no node pair in the namespaces: ~ts", [Why])};
        #{a := A, b := B, connect := #{ms := ConnectMs}} = Pair ->
            try
                Ms = maps:get(loss_ms, P),
                W = maps:get(wait_ms, P),
                Load = #{warm => maps:get(loss_warm, P), lead_ms => maps:get(loss_lead_ms, P)},
                %% inet_tcp's figures depend on it, and it differs between machines
                Cc = case peer:call(peer_of(A), file, read_file,
                                    ["/proc/sys/net/ipv4/tcp_congestion_control"], 5000) of
                         {ok, Name} -> string:trim(Name);
                         _ -> <<"?">>
                     end,
                case call(A, load_ping, [node_of(B), ?MIB, Ms, ?STARVE_MS, W, Load],
                          budget(load_ping, {Ms, ?STARVE_MS, W})) of
                    {ok, M} -> {ok, M#{first_connect_ms => ConnectMs,
                                       tcp_congestion_control => Cc}};
                    Other -> Other
                end
            after
                stop_pair(Pair)
            end
    end.

%% trust: a deployment of its own for the namespaces' addresses, the port fixed on both
%% sides (`listen', and `ports' for the peer) since there is no EPMD in the namespaces.
loss_prepare(inet_tcp, Opts, Net) ->
    Opts#{carrier => inet_tcp, cookie => cookie(), netns => Net};
loss_prepare(Carrier, #{tag := Tag} = Opts, Net) ->
    Mode = case Carrier of trust -> full; trust_restricted -> restricted end,
    Addr = fun(R) -> maps:get({addr, R}, Net) end,
    Dir = trust_cluster(Opts, Mode, atom_to_list(Mode) ++ "_loss", [{"l", Addr("a"), Addr("b")}]),
    NodeDir = fun(R) -> filename:join(Dir, Tag ++ "_trust_l_" ++ R) end,
    Node = fun(R) -> list_to_atom(Tag ++ "_trust_l_" ++ R ++ "@" ++ Addr(R)) end,
    [put_trust_config(filename:join(NodeDir(R), "sys.config"),
                      [{listen, #{port => ?LOSS_PORT}}, {ports, #{Node(Other) => ?LOSS_PORT}}])
     || {R, Other} <- [{"a", "b"}, {"b", "a"}]],
    Opts#{carrier => Carrier, cookie => cookie(), netns => Net, cluster => Dir}.

%% `faults-net.sh run' makes the namespaces and starts the wire, runs a command, and
%% deletes everything when that command ends (its EXIT trap; also on a signal). The
%% command here holds the namespaces open: it prints their names and waits for a line on
%% its standard input, which is this port, so EOF (this VM gone) ends it too.
loss_net_open(Opts) ->
    Hold = "echo \"netns $TD_NS_A $TD_NS_B $TD_ADDR_A $TD_ADDR_B\"; read _",
    Cmd = lists:join(" ", [shell_quote(faults_net(Opts)), "run" | ?LOSS_WIRE]
                     ++ ["--", "sh", "-c", shell_quote(Hold), "2>&1"]),
    Port = open_port({spawn, lists:flatten(Cmd)}, [exit_status, binary, {line, 4096}]),
    loss_net_wait(Port, [], erlang:monotonic_time(millisecond) + 30000).

loss_net_wait(Port, Lines, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    Out = fun() -> string:trim(lists:join("\n", lists:reverse(Lines))) end,
    receive
        {Port, {data, {eol, <<"netns ", Names/binary>>}}} ->
            case string:lexemes(binary_to_list(Names), " ") of
                [NsA, NsB, AddrA, AddrB] ->
                    log("namespaces ~s (~s) and ~s (~s), wire ~ts",
                        [NsA, AddrA, NsB, AddrB, lists:join(" ", ?LOSS_WIRE)]),
                    {ok, #{port => Port, {ns, "a"} => NsA, {ns, "b"} => NsB,
                           {addr, "a"} => AddrA, {addr, "b"} => AddrB}};
                _ ->
                    _ = loss_net_close(#{port => Port}),
                    {error, fmt("scripts/faults-net.sh run printed ~ts", [Names])}
            end;
        {Port, {data, {_, Line}}} ->
            loss_net_wait(Port, [binary_to_list(Line) | Lines], Deadline);
        {Port, {exit_status, _}} ->
            {na, loss_na(Out()), Out()}
    after Left ->
            catch port_close(Port),
            {error, fmt("scripts/faults-net.sh run: no namespaces within 30 s: ~ts", [Out()])}
    end.

%% Ends the holding command and waits until faults-net.sh has stopped the wire and
%% deleted the namespaces. Returns the wire's counters (it prints them when it stops).
loss_net_close(#{port := Port}) ->
    catch port_command(Port, "\n"),
    loss_net_drain(Port, #{}, erlang:monotonic_time(millisecond) + 20000).

loss_net_drain(Port, Counters, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive
        {Port, {data, {eol, <<"trust-dist-wire: stopped; ", Report/binary>>}}} ->
            loss_net_drain(Port, wire_counters(Report), Deadline);
        {Port, {data, _}} ->
            loss_net_drain(Port, Counters, Deadline);
        {Port, {exit_status, _}} ->
            Counters
    after Left ->
            log("WARNING: scripts/faults-net.sh did not finish within 20 s; its namespaces "
                "are removed by its EXIT trap or by the next `scripts/faults-net.sh clean`", []),
            catch port_close(Port),
            Counters
    end.

%% "ab.rx=12 ab.lost=1 ... ab.partition=false" -> #{<<"ab.rx">> => 12, ...}
wire_counters(Report) ->
    maps:from_list([{K, try binary_to_integer(V) catch error:badarg -> V end}
                    || KV <- binary:split(Report, <<" ">>, [global, trim_all]),
                       [K, V] <- [binary:split(KV, <<"=">>)]]).

wire_brief(W) ->
    Dir = fun(D) ->
                  Get = fun(K) -> maps:get(<<D/binary, ".", K/binary>>, W, 0) end,
                  Rx = Get(<<"rx">>),
                  Lost = Get(<<"lost">>),
                  fmt("~s lost ~b of ~b frames (~.2f %)",
                      [D, Lost, Rx, case Rx of 0 -> 0.0; _ -> 100 * Lost / Rx end])
          end,
    case map_size(W) of
        0 -> "no counters";
        _ -> Dir(<<"ab">>) ++ ", " ++ Dir(<<"ba">>)
    end.

%%% Carrier preparation

cookie() ->
    "bench_" ++ integer_to_list(erlang:unique_integer([positive])) ++ "_" ++ os:getpid().

prepare(Carrier, Opts) ->
    Base = Opts#{carrier => Carrier, cookie => cookie()},
    case Carrier of
        inet_tcp -> Base;
        inet_tls -> Base#{optfile => tls_optfile(Opts)};
        trust -> Base#{cluster => trust_cluster(Opts, full)};
        trust_restricted -> Base#{cluster => trust_cluster(Opts, restricted)}
    end.

%% A throwaway CA and one node certificate (ECDSA P-256) that both nodes present, valid
%% for 127.0.0.1 (the SNI inet_tls_dist sends is the host part of the node name).
tls_optfile(#{tmp := Tmp}) ->
    {ok, _} = application:ensure_all_started(crypto),
    Dir = filename:join(Tmp, "tls"),
    ok = filelib:ensure_path(Dir),
    Key = {key, {namedCurve, ?secp256r1}},
    Conf = public_key:pkix_test_data(
             #{root => [Key],
               intermediates => [],
               peer => [Key,
                        {extensions,
                         [#'Extension'{extnID = ?'id-ce-subjectAltName',
                                       extnValue = [{dNSName, "127.0.0.1"},
                                                    {dNSName, "localhost"},
                                                    {iPAddress, <<127, 0, 0, 1>>}],
                                       critical = false}]}]}),
    Cert = proplists:get_value(cert, Conf),
    {KeyType, KeyDer} = proplists:get_value(key, Conf),
    CAs = proplists:get_value(cacerts, Conf),
    CertFile = filename:join(Dir, "node.pem"),
    KeyFile = filename:join(Dir, "node.key"),
    CAFile = filename:join(Dir, "ca.pem"),
    ok = file:write_file(CertFile, public_key:pem_encode([{'Certificate', Cert, not_encrypted}])),
    ok = file:write_file(KeyFile, public_key:pem_encode([{KeyType, KeyDer, not_encrypted}])),
    ok = file:write_file(CAFile, public_key:pem_encode([{'Certificate', C, not_encrypted} || C <- CAs])),
    Common = [{certfile, CertFile}, {keyfile, KeyFile}, {cacertfile, CAFile},
              {verify, verify_peer}, {secure_renegotiate, true}],
    OptFile = filename:join(Dir, "ssl_dist.conf"),
    ok = file:write_file(OptFile, io_lib:format("~p.~n",
                                                [[{server, [{fail_if_no_peer_cert, true} | Common]},
                                                  {client, Common}]])),
    OptFile.

%% `trust-dist dev-cluster'. Full: every node tier admin. Restricted: A is a worker and B
%% an admin, so B decodes and judges every packet A sends (the workloads run on A against
%% processes on B); B's policy lets worker dial it and spawn the bench's own sink and echo
%% processes, nothing more.
trust_cluster(#{params := P} = Opts, Mode) ->
    Slots = ["m" | ["s" ++ integer_to_list(I) || I <- lists:seq(1, maps:get(setup_pairs, P))]],
    trust_cluster(Opts, Mode, atom_to_list(Mode),
                  [{S, "127.0.0.1", "127.0.0.1"} || S <- Slots]).

%% Slots: [{Slot, HostA, HostB}]; node Role of Slot is <tag>_trust_<Slot>_<Role>@Host.
trust_cluster(#{tmp := Tmp, cli := Cli, ebin := Ebin, tag := Tag}, Mode, DirName, Slots) ->
    filelib:is_regular(Cli) orelse error({missing, Cli, "run `mix compile` first"}),
    filelib:is_dir(Ebin) orelse error({missing, Ebin, "run `mix compile` first"}),
    Dir = filename:join(Tmp, DirName),
    Tier = fun("a") when Mode =:= restricted -> "worker"; (_) -> "admin" end,
    Nodes = [Tag ++ "_trust_" ++ S ++ "_" ++ R ++ "@" ++ H ++ ":" ++ Tier(R)
             || {S, HA, HB} <- Slots, {R, H} <- [{"a", HA}, {"b", HB}]],
    Cmd = lists:join(" ", [shell_quote(Cli), "dev-cluster", shell_quote(Dir),
                           "--tiers", "admin,worker",
                           "--ebin", shell_quote(Ebin) | Nodes]),
    {Status, Out} = run_cmd(lists:flatten(Cmd)),
    Status =:= 0 orelse error({dev_cluster_failed, Status, Out}),
    Mode =:= restricted andalso
        [restrict(filename:join([Dir, Tag ++ "_trust_" ++ S ++ "_b", "sys.config"]))
         || {S, _, _} <- Slots],
    Dir.

restrict(SysConfig) ->
    Policy = #{worker => #{connect => true,
                           rpc => [{erlang, node, 0}, {?MODULE, sink, 0}, {?MODULE, echo, 0},
                                  {?MODULE, echo_stamped, 0}]}},
    put_trust_config(SysConfig, [{policy, Policy}]).

%% Adds or replaces keys of the trust_dist section of a node's sys.config.
put_trust_config(SysConfig, Entries) ->
    {ok, [Config]} = file:consult(SysConfig),
    Section = lists:foldl(fun({K, _} = E, S) -> lists:keystore(K, 1, S, E) end,
                          proplists:get_value(trust_dist, Config), Entries),
    New = lists:keystore(trust_dist, 1, Config, {trust_dist, Section}),
    ok = file:write_file(SysConfig, io_lib:format("~tp.~n", [New])).

run_cmd(Cmd) ->
    Port = open_port({spawn, Cmd ++ " 2>&1"}, [exit_status, binary, stream]),
    run_cmd_loop(Port, <<>>).

run_cmd_loop(Port, Acc) ->
    receive
        {Port, {data, D}} -> run_cmd_loop(Port, <<Acc/binary, D/binary>>);
        {Port, {exit_status, S}} -> {S, Acc}
    after 60000 ->
            catch port_close(Port),
            {timeout, Acc}
    end.

shell_quote(S) -> "'" ++ lists:flatten(string:replace(S, "'", "'\\''", all)) ++ "'".

%%% Node pairs

start_pair(Ctx, Slot) ->
    case start_pair_noconnect(Ctx, Slot) of
        {error, _} = E -> E;
        #{a := A, b := B} = Pair ->
            try call(A, connect, [node_of(B), 30000], 30000) of
                {ok, Info} ->
                    Pair#{connect => Info};
                {error, Why} ->
                    stop_pair(Pair),
                    {error, fmt("connect failed: ~ts", [Why])}
            catch C:W ->
                    stop_pair(Pair),
                    {error, fmt("connect failed: ~p:~0p", [C, W])}
            end
    end.

start_pair_noconnect(Ctx, Slot) ->
    case start_node(Ctx, Slot, "b") of
        {error, Why} -> {error, fmt("starting node b: ~ts", [Why])};
        B ->
            case start_node(Ctx, Slot, "a") of
                {error, Why} ->
                    stop_node(B),
                    {error, fmt("starting node a: ~ts", [Why])};
                A ->
                    #{a => A, b => B}
            end
    end.

stop_pair({error, _}) -> ok;
stop_pair(#{a := A, b := B}) ->
    stop_node(A),
    stop_node(B).

start_node(#{carrier := Carrier, cookie := Cookie, bench_ebin := BenchEbin, tag := Tag} = Ctx,
           Slot, Role) ->
    Name = Tag ++ "_" ++ atom_to_list(Carrier) ++ "_" ++ Slot ++ "_" ++ Role,
    Common = ["-pa", BenchEbin],
    PeerOpts0 =
        case Carrier of
            inet_tcp ->
                #{name => list_to_atom(Name), host => host_of(Ctx, Role), longnames => true,
                  args => ["-setcookie", Cookie | Common]};
            inet_tls ->
                #{name => list_to_atom(Name), host => "127.0.0.1", longnames => true,
                  args => ["-setcookie", Cookie, "-proto_dist", "inet_tls",
                           "-ssl_dist_optfile", maps:get(optfile, Ctx) | Common]};
            _ when Carrier =:= trust; Carrier =:= trust_restricted ->
                VmArgs = filename:join([maps:get(cluster, Ctx),
                                        Tag ++ "_trust_" ++ Slot ++ "_" ++ Role, "vm.args"]),
                %% -name, -proto_dist trust, -setcookie, -pa ebin, -config come from vm.args
                #{args => ["-args_file", VmArgs | Common]}
        end,
    PeerOpts = in_netns(Ctx, Role, PeerOpts0),
    %% keep crash dumps of failing nodes out of the working directory
    Env = [{"ERL_CRASH_DUMP", filename:join(maps:get(tmp, Ctx), Name ++ ".erl_crash.dump")}],
    try peer:start(PeerOpts#{connection => standard_io, wait_boot => 30000, env => Env}) of
        {ok, Pid} -> registered_node(Pid);
        {ok, Pid, _Node} -> registered_node(Pid);
        {error, Why} -> {error, fmt("~0p", [Why])}
    catch C:W -> {error, fmt("peer:start ~p:~0p", [C, W])}
    end.

host_of(#{netns := Net}, Role) -> maps:get({addr, Role}, Net);
host_of(_Ctx, _Role) -> "127.0.0.1".

%% Loss rows: the node runs in its namespace (`ip netns exec', the same erl as this VM)
%% and finds its peer without EPMD: inet_tcp through -erl_epmd_port (every node listens
%% on, and dials, that port), trust through the `ports' map of its sys.config.
in_netns(#{netns := Net, carrier := Carrier}, Role, #{args := Args} = PeerOpts) ->
    Ip = os:find_executable("ip"),
    Ip =/= false orelse error({missing, "ip (iproute2)"}),
    Erl = filename:join([code:root_dir(), "bin", "erl"]),
    NoEpmd = case Carrier of
                 inet_tcp -> ["-start_epmd", "false", "-erl_epmd_port", integer_to_list(?LOSS_PORT)];
                 _ -> ["-no_epmd"]
             end,
    PeerOpts#{exec => {Ip, ["netns", "exec", maps:get({ns, Role}, Net), Erl]},
              args => Args ++ NoEpmd};
in_netns(_Ctx, _Role, PeerOpts) ->
    PeerOpts.

registered_node(Pid) ->
    put(peers, [Pid | get(peers)]),
    try
        Node = peer:call(Pid, erlang, node, [], 10000),
        OsPid = peer:call(Pid, os, getpid, [], 10000),
        Node =/= nonode@nohost orelse error(distribution_not_started),
        put({ospid, Pid}, OsPid),
        #{peer => Pid, node => Node, ospid => OsPid}
    catch C:W ->
            stop_peer(Pid),
            {error, fmt("node did not answer after boot: ~p:~0p", [C, W])}
    end.

node_of(#{node := N}) -> N.
os_pid_of(#{ospid := P}) -> P.
peer_of(#{peer := P}) -> P.

stop_node({error, _}) -> ok;
stop_node(#{peer := Pid}) -> stop_peer(Pid).

%% peer:stop closes the control port (the node halts on EOF); then make sure the OS
%% process is gone, and kill exactly that pid if it is not after 10 s.
stop_peer(Pid) ->
    put(peers, lists:delete(Pid, get(peers))),
    OsPid = erase({ospid, Pid}),
    {_, Ref} = spawn_monitor(fun() -> catch peer:stop(Pid) end),
    receive {'DOWN', Ref, process, _, _} -> ok
    after 15000 -> exit(Pid, kill)
    end,
    case OsPid of
        undefined -> ok;
        _ ->
            case wait_until(fun() -> not os_alive(OsPid) end, 10000) of
                ok -> ok;
                timeout ->
                    log("node os pid ~s did not exit; killing it", [OsPid]),
                    _ = os:cmd("kill -9 " ++ OsPid)
            end
    end.

os_alive(OsPid) ->
    %% a zombie would still have /proc/PID; check its state
    case file:read_file("/proc/" ++ OsPid ++ "/stat") of
        {ok, Stat} ->
            [_, After] = string:split(Stat, ")", trailing),
            case string:trim(After, leading) of
                <<"Z", _/binary>> -> false;
                <<"X", _/binary>> -> false;
                _ -> true
            end;
        {error, _} -> false
    end.

stop_all_peers() ->
    [stop_peer(P) || P <- get_peers()],
    ok.

get_peers() ->
    case get(peers) of undefined -> []; L -> L end.

%% peer:call to the benchmark module; the node-side functions return {ok, _} | {error, _}.
call(#{peer := Pid}, F, Args, Budget) ->
    peer:call(Pid, ?MODULE, F, Args, Budget + 15000).

%%%===================================================================
%%% Node side (runs on A unless noted)
%%%===================================================================

%% Runs Fun in a fresh process, so no stray message outlives a measurement, and bounds it.
isolated(Fun, Timeout) ->
    {Pid, Ref} = spawn_monitor(fun() -> exit({result, Fun()}) end),
    receive
        {'DOWN', Ref, process, Pid, {result, R}} -> R;
        {'DOWN', Ref, process, Pid, Reason} -> {error, fmt("workload crashed: ~0p", [Reason])}
    after Timeout ->
            exit(Pid, kill),
            {error, fmt("workload did not finish within ~b ms", [Timeout])}
    end.

os_pid() -> os:getpid().

connect(B, Timeout) ->
    isolated(fun() ->
                     T0 = erlang:monotonic_time(microsecond),
                     R = net_kernel:connect_node(B),
                     T1 = erlang:monotonic_time(microsecond),
                     case R of
                         true ->
                             %% prove the link carries traffic both ways
                             case catch erpc:call(B, erlang, node, [], 10000) of
                                 B -> {ok, #{ms => (T1 - T0) / 1000, info => link_info(B)}};
                                 Other -> {error, fmt("connected, but erpc to B failed: ~0p", [Other])}
                             end;
                         Other ->
                             {error, fmt("net_kernel:connect_node returned ~0p after ~b ms",
                                         [Other, (T1 - T0) div 1000])}
                     end
             end, Timeout).

link_info(B) ->
    case erlang:function_exported(trust_dist, links, 0) of
        true ->
            case catch trust_dist:links() of
                L when is_list(L) ->
                    [maps:map(fun(_, V) -> printable(V) end, M) || M <- L, maps:get(node, M, B) =:= B];
                _ -> []
            end;
        false -> []
    end.

%% Why a sender never finished: its state (suspended by whom, waiting where) and the
%% link's counters, so that a rare stall can be told from a slow link afterwards.
stuck_report(P, B) ->
    #{sender => erlang:process_info(P, [status, current_function, message_queue_len]),
      links => [maps:with([queued, packets_out, packets_in, bytes_out, bytes_in, quic], L)
                || L <- link_info(B)]}.

printable(V) when is_binary(V); is_number(V); is_atom(V) -> V;
printable(V) -> list_to_binary(fmt("~0p", [V])).

echo() ->
    receive
        {From, Msg} -> From ! {self(), Msg}, echo();
        stop -> ok
    end.

%% An echo that also says when the ping reached it (the OS's real-time clock, which
%% both nodes on this machine share), so a slow round trip is split into its two ways.
echo_stamped() ->
    receive
        {tail_counters, From} when is_pid(From) ->
            From ! {self(), tail_counters, tail_counters(node(From))}, echo_stamped();
        {From, Msg} -> From ! {self(), Msg, os:system_time(nanosecond)}, echo_stamped();
        stop -> ok
    end.

get_list(Key) ->
    case get(Key) of
        undefined -> [];
        L -> L
    end.

%% The one-way times of the pings, A to B (beside the bulk transfer) and B to A.
ping_splits() ->
    case erase(ping_splits) of
        Splits when is_list(Splits), Splits =/= [] ->
            #{p50_us := AB50, p99_us := AB99} = stats([F || {F, _} <- Splits]),
            #{p50_us := BA50, p99_us := BA99} = stats([B || {_, B} <- Splits]),
            Worst = lists:sublist(lists:reverse(lists:sort([F || {F, _} <- Splits])), 6),
            %% As text: a JSON list of small integers would read as a string.
            #{a_to_b_p50_us => AB50, a_to_b_p99_us => AB99,
              a_to_b_worst_us => iolist_to_binary(
                                   lists:join(" ", [integer_to_list(round(W / 1000)) || W <- Worst])),
              b_to_a_p50_us => BA50, b_to_a_p99_us => BA99};
        _ -> #{}
    end.

%% Counts everything it gets; `{done, From, Expected}' reports the count once it reaches
%% Expected and resets it. Waiting for the count matters when `done' comes from another
%% process than the messages: Erlang orders messages per sender only, and a carrier
%% with several streams per connection (trust) may deliver it before the last of them.
sink() -> sink(0).
sink(N) ->
    receive
        {done, From, Expected} when N >= Expected -> From ! {sink_done, self(), N}, sink(0);
        {done, From, Expected} -> sink_until(N, From, Expected);
        stop -> ok;
        _ -> sink(N + 1)
    end.

sink_until(N, From, Expected) when N >= Expected ->
    From ! {sink_done, self(), N},
    sink(0);
sink_until(N, From, Expected) ->
    receive
        stop -> ok;
        _ -> sink_until(N + 1, From, Expected)
    end.

spawn_sink(B) ->
    erlang:spawn_opt(B, ?MODULE, sink, [], [{message_queue_data, off_heap}]).

sink_sync(Sink, Timeout) ->
    Sink ! {done, self(), 0},
    receive {sink_done, Sink, N} -> {ok, N}
    after Timeout -> timeout
    end.

ping(Echo, StarveMs) ->
    T0 = erlang:monotonic_time(nanosecond),
    Echo ! {self(), p},
    receive
        {Echo, p} -> {ok, erlang:monotonic_time(nanosecond) - T0};
        {Echo, p, _} -> {ok, erlang:monotonic_time(nanosecond) - T0}
    after StarveMs -> starved
    end.

pings(_Echo, 0, _StarveMs, Acc) -> {ok, Acc};
pings(Echo, N, StarveMs, Acc) ->
    case ping(Echo, StarveMs) of
        {ok, Ns} -> pings(Echo, N - 1, StarveMs, [Ns | Acc]);
        starved -> {starved, Acc}
    end.

%% Metric 1: sequential small-message round trips A -> echo on B -> A.
rtt(B, Warm, N, StarveMs) ->
    isolated(
      fun() ->
              Echo = spawn(B, ?MODULE, echo, []),
              case pings(Echo, Warm, StarveMs, []) of
                  {ok, _} ->
                      Before = in_place_counts(B),
                      R = pings(Echo, N, StarveMs, []),
                      InPlace = in_place_since(Before, in_place_counts(B)),
                      Echo ! stop,
                      case R of
                          {ok, Samples} -> {ok, (stats(Samples))#{warmup => Warm, in_place => InPlace}};
                          {starved, S} -> {error, fmt("no echo within ~b ms after ~b round trips",
                                                      [StarveMs, length(S)])}
                      end;
                  {starved, _} ->
                      {error, fmt("no echo within ~b ms during warm-up", [StarveMs])}
              end
      end, budget(rtt, N)).

%% trust only: how many of A's sends to B were written into QUIC on the sending scheduler,
%% and how many of those also left from there (trust_dist:links/0).
in_place_counts(B) ->
    case link_info(B) of
        [#{writes_in_place := W, sent_in_place := S, packets_out := P} | _] ->
            #{writes => W, sent => S, packets_out => P};
        _ -> #{}
    end.

in_place_since(Before, After) when map_size(Before) > 0, map_size(After) > 0 ->
    maps:map(fun(K, V) -> V - maps:get(K, Before) end, After);
in_place_since(_, _) -> #{}.

send_loop(Dest, Msg, Deadline, Max, Check) -> send_loop(Dest, Msg, Deadline, Max, Check, 0).

send_loop(_Dest, _Msg, _Deadline, Max, _Check, N) when N >= Max -> N;
send_loop(Dest, Msg, Deadline, Max, Check, N) ->
    case N rem Check =:= 0 andalso erlang:monotonic_time(nanosecond) >= Deadline of
        true -> N;
        false ->
            Dest ! Msg,
            send_loop(Dest, Msg, Deadline, Max, Check, N + 1)
    end.

%% Metrics 2 and 6: one sender on A streams Size-byte binaries to a sink on B for DurMs
%% (or MaxBytes); the clock stops when B reports it has received every message. CPU time
%% of both OS processes (all threads) is read from /proc around the measured interval.
throughput(B, BOsPid, Size, {DurMs, WaitMs}, MaxBytes, ClkTck) ->
    isolated(
      fun() ->
              Sink = spawn_sink(B),
              Bin = crypto:strong_rand_bytes(Size),
              Warm = max(4, (16 * ?MIB) div Size),
              _ = send_loop(Sink, Bin, infinity_ns(), Warm, 1),
              case sink_sync(Sink, WaitMs) of
                  {ok, Warm} -> ok;
                  WarmR -> exit({warmup, WarmR})
              end,
              APid = os:getpid(),
              CpuA0 = proc_cpu(APid), CpuB0 = proc_cpu(BOsPid),
              T0 = erlang:monotonic_time(nanosecond),
              Count = send_loop(Sink, Bin, T0 + DurMs * 1000000, max(1, MaxBytes div Size), 1),
              TSent = erlang:monotonic_time(nanosecond),
              Sink ! {done, self(), Count},
              receive
                  {sink_done, Sink, Got} ->
                      T1 = erlang:monotonic_time(nanosecond),
                      CpuA1 = proc_cpu(APid), CpuB1 = proc_cpu(BOsPid),
                      Sink ! stop,
                      Bytes = Count * Size,
                      Secs = (T1 - T0) / 1.0e9,
                      GB = Bytes / 1.0e9,
                      CpuA = (CpuA1 - CpuA0) / ClkTck,
                      CpuB = (CpuB1 - CpuB0) / ClkTck,
                      case Got =:= Count of
                          true ->
                              {ok, #{msg_bytes => Size, messages => Count, bytes => Bytes,
                                     seconds => Secs, send_seconds => (TSent - T0) / 1.0e9,
                                     mb_per_s => Bytes / 1.0e6 / Secs,
                                     cpu_sender_s => CpuA, cpu_receiver_s => CpuB,
                                     cpu_sender_s_per_gb => CpuA / GB,
                                     cpu_receiver_s_per_gb => CpuB / GB,
                                     cpu_total_s_per_gb => (CpuA + CpuB) / GB,
                                     clk_tck => ClkTck}};
                          false ->
                              {error, fmt("B received ~b of ~b messages", [Got, Count])}
                      end
              after WaitMs ->
                      {error, fmt("B did not confirm ~b messages (~b MB) within ~b ms after "
                                  "the sender finished", [Count, Count * Size div 1000000, WaitMs])}
              end
      end, budget(throughput, {DurMs, WaitMs})).

infinity_ns() -> erlang:monotonic_time(nanosecond) + 3600 * 1000000000.

%% utime + stime (clock ticks) of an OS process, all threads included.
proc_cpu(OsPid) ->
    {ok, Stat} = file:read_file("/proc/" ++ OsPid ++ "/stat"),
    [_, After] = string:split(Stat, ")", trailing),
    Fields = string:lexemes(After, " "),
    %% After ")" the fields start at field 3 (state); utime is field 14, stime 15.
    binary_to_integer(lists:nth(12, Fields)) + binary_to_integer(lists:nth(13, Fields)).

%% Metric 3: Senders processes on A, each streaming Size-byte binaries to its own sink on
%% B for DurMs; messages/s = all messages / time until every sink has confirmed.
rate(B, BOsPid, Senders, Size, DurMs, WaitMs) ->
    isolated(
      fun() ->
              Self = self(),
              Bin = crypto:strong_rand_bytes(Size),
              Sinks = [spawn_sink(B) || _ <- lists:seq(1, Senders)],
              [begin _ = send_loop(S, Bin, infinity_ns(), 2000, 1), {ok, 2000} = sink_sync(S, WaitMs) end
               || S <- Sinks],
              Pids = [spawn_link(fun() ->
                                         receive {go, Deadline} -> ok end,
                                         C = send_loop(S, Bin, Deadline, 1 bsl 40, 64),
                                         S ! {done, Self, C},
                                         Self ! {sent, self(), C}
                                 end) || S <- Sinks],
              T0 = erlang:monotonic_time(nanosecond),
              [P ! {go, T0 + DurMs * 1000000} || P <- Pids],
              Sent = lists:sum([receive {sent, P, C} -> C
                                after DurMs + WaitMs ->
                                        exit({sender_stuck, stuck_report(P, B), threads(BOsPid)})
                                end || P <- Pids]),
              Got = collect_sinks(Sinks, 0, erlang:monotonic_time(millisecond) + WaitMs),
              T1 = erlang:monotonic_time(nanosecond),
              [S ! stop || S <- Sinks],
              case Got of
                  {ok, Sent} ->
                      Secs = (T1 - T0) / 1.0e9,
                      {ok, #{senders => Senders, msg_bytes => Size, messages => Sent,
                             seconds => Secs, msgs_per_s => Sent / Secs,
                             mb_per_s => Sent * Size / 1.0e6 / Secs}};
                  {ok, N} -> {error, fmt("B received ~b of ~b messages", [N, Sent])};
                  timeout -> {error, fmt("B did not confirm all messages within ~b ms; ~0p; ~ts",
                                         [WaitMs, stall_report(B), threads(BOsPid)])}
              end
      end, budget(rate, {DurMs, WaitMs})).

%% Where every thread of B's OS process is (gdb, when installed), written to a file whose
%% name is returned: a transport thread blocked on a lock shows there.
threads(OsPid) ->
    case os:find_executable("gdb") of
        false -> "no gdb for a thread dump of B";
        Gdb ->
            File = fmt("/tmp/dist_bench_stall_~s_~b.txt", [OsPid, erlang:system_time(second)]),
            _ = os:cmd(fmt("~ts -p ~s -batch -ex 'thread apply all bt 40' > ~ts 2>&1",
                           [Gdb, OsPid, File])),
            "thread dump of B: " ++ File
    end.

%% Both ends' view of a link that stopped moving: what each has queued, sent and received,
%% and QUIC's flow-control frames (a peer that stopped reading shows *_BLOCKED frames).
stall_report(B) ->
    Keys = [queued, packets_out, packets_in, bytes_out, bytes_in, quic],
    Them = case catch erpc:call(B, trust_dist, links, [], 5000) of
               L when is_list(L) -> [maps:with(Keys, M) || M <- L, maps:get(node, M) =:= node()];
               Other -> Other
           end,
    #{a => [maps:with(Keys, M) || M <- link_info(B)], b => Them}.

collect_sinks([], Acc, _Deadline) -> {ok, Acc};
collect_sinks([S | Rest], Acc, Deadline) ->
    Left = max(0, Deadline - erlang:monotonic_time(millisecond)),
    receive {sink_done, S, N} -> collect_sinks(Rest, Acc + N, Deadline)
    after Left -> timeout
    end.

%% Metric 4 (and the loss rows): back-to-back pings from A while a second process on A
%% saturates the same link with Size-byte messages. A ping without reply within StarveMs
%% counts as starved. The pinger and bulk sender are separate processes (a send to a busy
%% link suspends the sender), so this coordinator never blocks and can enforce every
%% bound. Warm pings go first, on the idle link; the bulk sender then gets LeadMs alone.
load_ping(B, Size, DurMs, StarveMs, WaitMs, #{warm := Warm, lead_ms := LeadMs}) ->
    isolated(
      fun() ->
              Self = self(),
              Echo = spawn(B, ?MODULE, echo_stamped, []),
              Sink = spawn_sink(B),
              {ok, Idle} = pings(Echo, Warm, StarveMs, []),
              {ok, 0} = sink_sync(Sink, WaitMs),
              Bin = crypto:strong_rand_bytes(Size),
              TB0 = erlang:monotonic_time(nanosecond),
              Bulk = spawn(fun() -> bulk(Self, Sink, Bin, 0) end),
              timer:sleep(LeadMs),   % let the bulk sender fill the pipe
              Deadline = erlang:monotonic_time(nanosecond) + DurMs * 1000000,
              Pinger = spawn(fun() -> pinger(Self, Echo, Deadline) end),
              Sampler = spawn(fun() -> quic_sampler(B, []) end),
              Pings = collect_pings(Pinger, StarveMs, []),
              Quic0 = maps:merge(quic_samples(Sampler, B), ping_splits()),
              %% From a helper: on a busy link (inet_tls's, starved) the send suspends
              %% its sender, and this process must go on to stop the bulk.
              spawn(fun() -> Echo ! {tail_counters, Self} end),
              Quic = receive
                         {Echo, tail_counters, EchoSide} ->
                             maps:merge(Quic0, maps:from_list(
                                                 [{list_to_atom("b_" ++ atom_to_list(K)), V}
                                                  || {K, V} <- maps:to_list(EchoSide)]))
                     after 2000 -> Quic0
                     end,
              %% If starved: did the ping never leave A (sender suspended on a busy
              %% link) or is its reply outstanding (waiting in receive)?
              PingerState = printable(erlang:process_info(Pinger, [status, current_function])),
              exit(Pinger, kill),
              Bulk ! stop,
              Sent = receive {bulk_sent, Bulk, N} -> N
                     after WaitMs -> exit(Bulk, kill), undefined
                     end,
              Drain = case Sent of
                          undefined -> undefined;
                          _ ->
                              %% the send may block on a busy link: use a helper
                              spawn(fun() -> Sink ! {done, Self, Sent} end),
                              receive {sink_done, Sink, Got} ->
                                      {Got, erlang:monotonic_time(nanosecond)}
                              after WaitMs -> undefined
                              end
                      end,
              spawn(fun() -> Echo ! stop, Sink ! stop end),
              Bulk1 = case Drain of
                          {Sent, T1} ->
                              #{bulk_mb_per_s => Sent * Size / 1.0e6 / ((T1 - TB0) / 1.0e9),
                                bulk_messages => Sent};
                          {Got1, _} ->
                              #{bulk_error => list_to_binary(
                                                fmt("B received ~b of ~b bulk messages", [Got1, Sent]))};
                          undefined when Sent =:= undefined ->
                              #{bulk_error => list_to_binary(
                                                fmt("bulk sender still blocked ~b ms after stop", [WaitMs]))};
                          undefined ->
                              #{bulk_error => list_to_binary(
                                                fmt("B did not confirm the bulk messages within ~b ms", [WaitMs]))}
                      end,
              %% the idle round trip, for comparison (and, on the impaired wire, as
              %% proof of its delay)
              Bulk2 = maps:merge(Bulk1#{idle_p50_us => maps:get(p50_us, stats(Idle)),
                                        idle_n => Warm, lead_ms => LeadMs}, Quic),
              case Pings of
                  {ok, Samples} when Samples =/= [] ->
                      {ok, maps:merge((stats(Samples))#{starved => false}, Bulk2)};
                  {_, Samples} ->
                      Base = case Samples of [] -> #{n => 0}; _ -> stats(Samples) end,
                      {ok, maps:merge(Base#{starved => true, starve_ms => StarveMs,
                                            pinger_state => PingerState}, Bulk2)}
              end
      end, budget(load_ping, {DurMs, StarveMs, WaitMs})).

%% QUIC's own view of the path while the ping test runs (trust only): its RTT estimate
%% and congestion window, sampled every 20 ms. A ping that waits while QUIC's RTT stays
%% low waits above the transport; one that waits with it waits in the transport's queues.
quic_sampler(B, Acc) ->
    receive
        {stop, From} -> From ! {quic_samples, self(), Acc}
    after 20 ->
            Sample = [{Rtt, Cwnd} || #{node := N, quic := #{rtt_us := Rtt, cwnd := Cwnd}}
                                         <- catch_links(), N =:= B],
            quic_sampler(B, Sample ++ Acc)
    end.

catch_links() ->
    case catch trust_dist:links() of
        L when is_list(L) -> L;
        _ -> []
    end.

%% This node's counters of its tail work on its link to Peer: copies it sent, copies
%% of Peer's packets that came first, probes after bursts.
tail_counters(Peer) ->
    maps:from_list([{K, V} || #{node := N} = L <- catch_links(), N =:= Peer,
                              K <- [copies_out, copies_used, tail_probes, reopenings, lane_moves],
                              {ok, V} <- [maps:find(K, L)]]).

quic_samples(Sampler, B) ->
    Sampler ! {stop, self()},
    receive
        {quic_samples, Sampler, []} -> #{};
        {quic_samples, Sampler, Samples} ->
            Rtts = lists:sort([R || {R, _} <- Samples]),
            Cwnds = lists:sort([C || {_, C} <- Samples]),
            (tail_counters(B))#{quic_rtt_p50_us => median(Rtts), quic_rtt_max_us => lists:last(Rtts),
                  quic_cwnd_p50 => median(Cwnds)}
    after 5000 -> #{}
    end.

bulk(Owner, Sink, Bin, N) ->
    receive
        stop -> Owner ! {bulk_sent, self(), N}
    after 0 ->
            Sink ! Bin,
            bulk(Owner, Sink, Bin, N + 1)
    end.

pinger(Owner, Echo, Deadline) ->
    case erlang:monotonic_time(nanosecond) >= Deadline of
        true -> Owner ! {pinger_done, self()};
        false ->
            T0 = erlang:monotonic_time(nanosecond),
            S0 = os:system_time(nanosecond),
            Echo ! {self(), p},
            receive
                {Echo, p} -> Split = none;
                {Echo, p, SB} -> Split = {SB - S0, os:system_time(nanosecond) - SB}
            end,
            Owner ! {ping_sample, self(), erlang:monotonic_time(nanosecond) - T0, Split},
            pinger(Owner, Echo, Deadline)
    end.

%% Each ping is sent right after the previous sample arrives, so "no event for StarveMs"
%% means the outstanding ping (send included) has waited that long.
collect_pings(Pinger, StarveMs, Acc) ->
    receive
        {ping_sample, Pinger, Ns, Split} ->
            put(ping_splits, [Split || Split =/= none] ++ get_list(ping_splits)),
            collect_pings(Pinger, StarveMs, [Ns | Acc]);
        {pinger_done, Pinger} -> {ok, Acc}
    after StarveMs -> {starved, Acc}
    end.

%% Latency statistics in microseconds from nanosecond samples.
stats(Samples) ->
    Sorted = lists:sort(Samples),
    N = length(Sorted),
    #{n => N,
      p50_us => pct(Sorted, N, 0.50) / 1000,
      p90_us => pct(Sorted, N, 0.90) / 1000,
      p99_us => pct(Sorted, N, 0.99) / 1000,
      min_us => hd(Sorted) / 1000,
      max_us => lists:last(Sorted) / 1000,
      mean_us => lists:sum(Sorted) / N / 1000}.

pct(Sorted, N, P) ->
    lists:nth(max(1, min(N, ceil(P * N))), Sorted).

median(L) ->
    S = lists:sort(L),
    N = length(S),
    case N rem 2 of
        1 -> lists:nth(N div 2 + 1, S);
        0 -> (lists:nth(N div 2, S) + lists:nth(N div 2 + 1, S)) / 2
    end.

%%%===================================================================
%%% Reporting
%%%===================================================================

loadavg() ->
    case file:read_file("/proc/loadavg") of
        {ok, B} ->
            [L | _] = string:lexemes(B, " "),
            binary_to_float(L);
        _ -> 0.0
    end.

meta(#{params := P, carriers := Cs, quick := Q, clk_tck := Tck, load_before := L0} = Opts,
     Elapsed) ->
    {ok, Host} = inet:gethostname(),
    #{otp_release => list_to_binary(erlang:system_info(otp_release)),
      erts_version => list_to_binary(erlang:system_info(version)),
      host => list_to_binary(Host),
      cpus => erlang:system_info(logical_processors_available),
      cpu_model => cpu_model(),
      date => list_to_binary(calendar:system_time_to_rfc3339(erlang:system_time(second))),
      mode => list_to_binary(mode(Q)),
      carriers => Cs,
      params => P,
      clk_tck => Tck,
      loadavg_1m_before => L0,
      loss_wire => list_to_binary(lists:join(" ", ?LOSS_WIRE)),
      loss_rows => maps:get(loss, Opts),
      loss_only => maps:get(loss_only, Opts, false),
      loadavg_1m_after => loadavg(),
      run_seconds => Elapsed}.

cpu_model() ->
    case file:read_file("/proc/cpuinfo") of
        {ok, B} ->
            case re:run(B, "model name\\s*:\\s*([^\\n]*)", [{capture, all_but_first, binary}]) of
                {match, [M]} -> M;
                _ -> <<"unknown">>
            end;
        _ -> <<"unknown">>
    end.

%% {Label, Metric, Field, Format}
rows() ->
    [{"RTT small msg p50 (µs)", rtt, p50_us, us},
     {"RTT small msg p99 (µs)", rtt, p99_us, us},
     {"throughput 64 KiB msgs (MB/s)", tput_64k, mb_per_s, int},
     {"throughput 1 MiB msgs (MB/s)", tput_1m, mb_per_s, int},
     {"100 B msgs, 4 senders (msg/s)", rate_100b, msgs_per_s, int},
     {"ping under 1 MiB bulk p50 (µs)", load_ping, p50_us, ping},
     {"ping under 1 MiB bulk p99 (µs)", load_ping, p99_us, ping},
     {"  one way A to B (beside the bulk) p99 (µs)", load_ping, a_to_b_p99_us, us},
     {"  one way B to A (no bulk) p99 (µs)", load_ping, b_to_a_p99_us, us},
     {"  bulk rate during ping test (MB/s)", load_ping, bulk_mb_per_s, int},
     {"1 % loss, 50 ms RTT: idle ping p50 (ms)", loss_ping, idle_p50_us, ping_ms},
     {"1 % loss, 50 ms RTT: ping p50 during 1 MiB bulk (ms)", loss_ping, p50_us, ping_ms},
     {"1 % loss, 50 ms RTT: ping p99 during 1 MiB bulk (ms)", loss_ping, p99_us, ping_ms},
     {"  pings answered during that bulk", loss_ping, n, int},
     {"  bulk rate during that ping test (MB/s)", loss_ping, bulk_mb_per_s, rate},
     {"first connect, fresh pair, median (ms)", setup, median_ms, ms},
     {"reconnect, warm nodes, median (ms)", reconnect, median_ms, ms},
     {"CPU s/GB @1 MiB, sender (A)", tput_1m, cpu_sender_s_per_gb, cpu},
     {"CPU s/GB @1 MiB, receiver (B)", tput_1m, cpu_receiver_s_per_gb, cpu},
     {"CPU s/GB @1 MiB, sum", tput_1m, cpu_total_s_per_gb, cpu}].

render_markdown(Results, Meta) ->
    Carriers = [C || {C, _} <- Results],
    Header = ["metric" | [column_name(C) || C <- Carriers]],
    %% failures are numbered once per distinct (carrier, message) and referenced in cells
    Notes0 = lists:usort([{C, K, flat(E)} || {C, R} <- Results, K <- metric_keys(),
                                              {error, E} <- [maps:get(K, R, {ok, x})]]),
    Msgs = lists:foldl(fun({C, _K, E}, Acc) ->
                               case lists:keymember({C, E}, 1, Acc) of
                                   true -> Acc;
                                   false -> Acc ++ [{{C, E}, length(Acc) + 1}]
                               end
                       end, [], [N || {C0, _, _} = N <- Notes0, C <- Carriers, C0 =:= C]),
    Cell = fun(C, {error, E}, _F, _Fmt) ->
                   {_, I} = lists:keyfind({C, flat(E)}, 1, Msgs),
                   "FAIL [" ++ integer_to_list(I) ++ "]";
              (_C, V, F, Fmt) -> cell(V, F, Fmt)
           end,
    Rows = [[Label | [Cell(C, maps:get(Key, R, {error, "not run"}), Field, Format)
                      || {C, R} <- Results]]
            || {Label, Key, Field, Format} <- rows()],
    Widths = [lists:max([string:length(lists:nth(I, Row)) || Row <- [Header | Rows]])
              || I <- lists:seq(1, length(Header))],
    Line = fun(Row) ->
                   ["| ", lists:join(" | ", [pad(Cl, W, I) || {Cl, W, I} <-
                                                                   lists:zip3(Row, Widths, lists:seq(1, length(Row)))]),
                    " |\n"]
           end,
    Sep = ["|", lists:join("|", [[$-, lists:duplicate(W, $-), case I of 1 -> $-; _ -> $: end]
                                 || {W, I} <- lists:zip(Widths, lists:seq(1, length(Widths)))]), "|\n"],
    #{otp_release := Otp, cpus := Cpus, cpu_model := Model, date := Date, mode := Mode,
      run_seconds := Secs, params := P, loadavg_1m_before := L0, loadavg_1m_after := L1} = Meta,
    Failures = [io_lib:format("[~b] **~s** (~ts): ~ts~n~n",
                              [I, column_name(C),
                               lists:join(", ", [atom_to_list(K) || {C1, K, E1} <- Notes0,
                                                                    C1 =:= C, E1 =:= E]),
                               E])
                || {{C, E}, I} <- Msgs],
    Starved = [io_lib:format("- **~s**~ts: a ping got no reply within ~b s while the bulk transfer ran "
                             "(~b pings answered before); pinger process at that moment: ~ts~n",
                             [column_name(C), case K of load_ping -> ""; loss_ping -> " (loss row)" end,
                              ?STARVE_MS div 1000, maps:get(n, M, 0),
                              maps:get(pinger_state, M, <<"?">>)])
               || {C, R} <- Results, K <- [load_ping, loss_ping],
                  {ok, #{starved := true} = M} <- [maps:get(K, R, none)]],
    Loss = loss_notes(Results),
    Info = [io_lib:format("- trust link (A's view, from trust_dist:links/0): mode ~p, tier ~ts, "
                          "peer certified as ~ts~n",
                          [maps:get(mode, I, '?'), maps:get(tier, I, <<"?">>),
                           maps:get(certified_as, I, <<"?">>)])
            || {C, R} <- Results, C =:= trust orelse C =:= trust_restricted,
               {ok, #{link_info := Is}} <- [maps:get(link, R, none)],
               I <- Is],
    unicode:characters_to_binary(
      [io_lib:format("## Distribution carrier benchmark (~s mode~s)~n~n",
                     [Mode, case Meta of #{loss_only := true} -> ", loss rows only"; _ -> "" end]),
       io_lib:format("OTP ~s, ~b logical CPUs (~ts), loopback (loss rows: network namespaces "
                     "joined by trust-dist-wire), ~ts; run took ~.1f s; "
                     "1-min load average ~.2f before, ~.2f after.~n~n",
                     [Otp, Cpus, Model, Date, Secs, L0, L1]),
       Line(Header), Sep, [Line(R) || R <- Rows],
       "\n",
       notes(P),
       case Starved of [] -> []; _ -> ["\nStarved pings:\n", Starved] end,
       case Info of [] -> []; _ -> ["\n", Info] end,
       case Loss of [] -> []; _ -> ["\n", Loss] end,
       render_targets(Results),
       case Failures of [] -> []; _ -> ["\nFailures:\n", Failures] end]).

%% Under the table: what the wire did to each carrier's loss run (proof that the
%% impairment happened), or why there was no loss run.
loss_notes(Results) ->
    Ran = [io_lib:format("- loss row, ~s: wire ~ts; first connect ~.1f ms~ts~n",
                         [column_name(C), wire_brief(W), float(maps:get(first_connect_ms, M, 0)),
                          case C of
                              inet_tcp -> [", TCP congestion control ",
                                           maps:get(tcp_congestion_control, M, <<"?">>)];
                              _ -> ""
                          end])
           || {C, R} <- Results, {ok, #{wire := W} = M} <- [maps:get(loss_ping, R, none)]],
    Why = lists:usort([Why || {_, R} <- Results,
                              {ok, #{na_reason := Why}} <- [maps:get(loss_ping, R, none)]]),
    Ran ++ [io_lib:format("- loss rows not measured: ~ts~n", [W]) || W <- Why].

column_name(inet_tcp) -> "inet_tcp";
column_name(inet_tls) -> "inet_tls";
column_name(trust) -> "trust (full)";
column_name(trust_restricted) -> "trust (restricted)";
column_name(raw_quinn) -> "raw quinn".

notes(P) ->
    io_lib:format(
      "Notes: every node pair is two fresh BEAM nodes (default flags, 2 schedulers) started with "
      "`peer` (standard_io control channel); workloads run on A against processes on B. "
      "RTT: ~b sequential round trips after ~b warm-up. Throughput: one sender, ~b ms of "
      "sending (cap ~b MiB), clock stops when B confirms receipt, median of ~b such runs "
      "(raw quinn likewise); MB = 10^6 bytes. "
      "Rate: ~b senders -> ~b sinks, 100-byte binaries, ~b ms. Ping under load: back-to-back "
      "pings for ~b ms while another process on A streams 1 MiB binaries; >~b s = starved; "
      "its one-way times are stamped with the OS clock both nodes share (the echo stamps its "
      "receipt), and trust's JSON adds QUIC's own RTT estimate sampled every 20 ms. "
      "Setup: `net_kernel:connect_node/1` timed on A, median of ~b fresh pairs (includes "
      "first-use code loading); reconnect: ~b disconnect/connect cycles on the warm main pair. "
      "CPU: utime+stime of each node's OS process (all threads) from /proc during the "
      "1 MiB throughput case (its median run). TLS: OTP defaults, ECDSA P-256 certs, verify_peer both ways. "
      "trust (full): `trust-dist dev-cluster`, both nodes tier admin. trust (restricted): A is "
      "tier worker, B tier admin, so B filters everything A sends (B's policy allows worker "
      "to connect and to spawn the bench's sink and echo). "
      "Loss rows: the ping-under-load workload for ~b ms (after ~b idle pings and ~b ms of "
      "bulk alone) between a fresh pair whose nodes sit in two network namespaces joined by "
      "trust-dist-wire (scripts/faults-net.sh run ~ts: 25 ms and 1 % loss each way, a 50 ms "
      "round trip), no EPMD (a fixed port); inet_tls and raw quinn are not run there.~n",
      [maps:get(rtt_n, P), maps:get(rtt_warm, P), maps:get(tput_ms, P),
       maps:get(tput_max, P) div ?MIB, maps:get(tput_runs, P),
       maps:get(rate_senders, P), maps:get(rate_senders, P),
       maps:get(rate_ms, P), maps:get(load_ms, P), ?STARVE_MS div 1000,
       maps:get(setup_pairs, P), maps:get(reconnects, P),
       maps:get(loss_ms, P), maps:get(loss_warm, P), maps:get(loss_lead_ms, P),
       lists:join(" ", ?LOSS_WIRE)]).

pad(Cell, W, 1) -> string:pad(Cell, W, trailing);
pad(Cell, W, _) -> string:pad(Cell, W, leading).

flat(E) -> lists:flatten(io_lib:format("~ts", [E])).

cell({ok, #{na := Why}}, _Field, _Format) ->
    "n/a: " ++ binary_to_list(Why);
cell({ok, #{starved := true}}, p99_us, Format) when Format =:= ping; Format =:= ping_ms ->
    ">10 s (starved)";
cell({ok, #{starved := true, n := 0}}, p50_us, Format) when Format =:= ping; Format =:= ping_ms ->
    ">10 s (starved)";
cell({ok, M}, Field, Format) ->
    case maps:find(Field, M) of
        {ok, V} -> format(V, Format);
        error when Field =:= bulk_mb_per_s ->
            case M of #{bulk_error := _} -> "n/a (bulk stuck)"; _ -> "n/a" end;
        error -> "n/a"
    end.

truncate(S, N) ->
    case string:length(S) > N of
        true -> string:slice(S, 0, N) ++ "…";
        false -> S
    end.

format(V, us) when V < 100 -> fnum(V, 1);
format(V, us) -> fnum(V, 0);
format(V, ping) -> format(V, us);
format(V, ping_ms) -> format(V / 1000, ms);
format(V, rate) when V < 100 -> fnum(V, 1);
format(V, rate) -> format(V, int);
format(V, int) -> group(round(V));
format(V, ms) when V < 10 -> fnum(V, 2);
format(V, ms) -> fnum(V, 1);
format(V, cpu) -> fnum(V, 2).

fnum(V, 0) -> group(round(V));
fnum(V, D) -> float_to_list(float(V), [{decimals, D}]).

group(N) when N < 0 -> "-" ++ group(-N);
group(N) when N < 1000 -> integer_to_list(N);
group(N) -> group(N div 1000) ++ "," ++ string:pad(integer_to_list(N rem 1000), 3, leading, $0).

%%% The transport alone: one QUIC stream between two endpoints set up as the carrier sets
%%% up its own (native/net/src/reference.rs), no BEAM. Built by bench/run.sh; the same
%%% throughput duration as the carriers. Metrics it has no counterpart for read "n/a".

raw_quinn(#{root := Root, params := P}) ->
    Bin = filename:join([Root, "target", "release", "examples", "raw_quinn"]),
    Secs = maps:get(tput_ms, P) / 1000,
    NA = maps:from_list([{K, {ok, #{}}} || K <- metric_keys()]),
    case filelib:is_regular(Bin) of
        false ->
            Why = "not built (cargo build --release -p trust_dist_net --example raw_quinn)",
            maps:from_list([{K, {error, Why}} || K <- metric_keys()]);
        true ->
            {Status, Out0} = run_cmd(fmt("~ts ~.2f ~b", [Bin, Secs, maps:get(tput_runs, P)])),
            Out = binary_to_list(Out0),
            KV = maps:from_list([{K, V} || T <- string:lexemes(Out, " \n"),
                                           [K, V0] <- [string:split(T, "=")],
                                           {V, _} <- [string:to_float(V0)], is_float(V)]),
            case {Status, KV} of
                {0, #{"tput_65536" := T64, "tput_1048576" := T1M,
                      "rtt_p50_us" := P50, "rtt_p99_us" := P99}} ->
                    log("raw_quinn: 64 KiB ~.1f MB/s, 1 MiB ~.1f MB/s, RTT p50 ~.1f us",
                        [T64, T1M, P50]),
                    NA#{rtt => {ok, #{p50_us => P50, p99_us => P99}},
                        tput_64k => {ok, #{mb_per_s => T64}},
                        tput_1m => {ok, #{mb_per_s => T1M}}};
                _ ->
                    Why = fmt("raw_quinn exited ~p: ~ts", [Status, Out]),
                    maps:from_list([{K, {error, Why}} || K <- metric_keys()])
            end
    end.

%%% The performance targets, as ratios within this one run.

%% {Label, Target text, Metric, Field, Carrier, Anchor carrier, Check}
targets() ->
    [{"1 MiB throughput vs inet_tls", ">= 4x", tput_1m, mb_per_s, trust, inet_tls,
      fun(R) -> R >= 4 end},
     {"1 MiB throughput vs raw quinn", ">= 0.8x", tput_1m, mb_per_s, trust, raw_quinn,
      fun(R) -> R >= 0.8 end},
     {"RTT p50 vs inet_tcp", "<= 1.3x", rtt, p50_us, trust, inet_tcp,
      fun(R) -> R =< 1.3 end},
     {"RTT p50 vs inet_tls", "<= 1x", rtt, p50_us, trust, inet_tls,
      fun(R) -> R =< 1.0 end},
     {"100 B msgs/s, 4 senders, vs inet_tcp", ">= 1x", rate_100b, msgs_per_s, trust,
      inet_tcp, fun(R) -> R >= 1 end},
     {"ping p99 under 1 MiB bulk", "<= 1 ms", load_ping, p99_us, trust, none,
      fun(V) -> V =< 1000 end},
     {"loss 1 %, 50 ms RTT: ping p99 during bulk (µs) vs inet_tcp", "<= 0.3x", loss_ping,
      p99_us, trust, inet_tcp, fun(R) -> R =< 0.3 end},
     {"CPU s/GB, both nodes", "<= 5", tput_1m, cpu_total_s_per_gb, trust, none,
      fun(V) -> V =< 5 end},
     {"restricted vs full, 1 MiB throughput", ">= 0.9x", tput_1m, mb_per_s,
      trust_restricted, trust, fun(R) -> R >= 0.9 end},
     {"first connection vs inet_tcp", "<= 1x", setup, median_ms, trust, inet_tcp,
      fun(R) -> R =< 1 end}].

value(Results, Carrier, Metric, Field) ->
    case lists:keyfind(Carrier, 1, Results) of
        {_, R} ->
            case maps:get(Metric, R, none) of
                {ok, #{starved := true}} when Field =:= p99_us -> starved;
                {ok, #{Field := V}} when is_number(V) -> V;
                _ -> none
            end;
        false -> none
    end.

render_targets(Results) ->
    Rows = [target_row(T, Results) || T <- targets()],
    ["\n### Targets (ratios within this run)\n\n",
     "| target | wanted | trust | anchor | ratio | met |\n",
     "|---|---|--:|--:|--:|---|\n",
     [io_lib:format("| ~ts | ~ts | ~ts | ~ts | ~ts | ~ts |~n", Row) || Row <- Rows]].

target_row({Label, Want, Metric, Field, C, Anchor, Check}, Results) ->
    V = value(Results, C, Metric, Field),
    Cell = fun(none) -> "n/a";
              (starved) -> "starved";
              (X) when X >= 1000 -> fnum(X, 0);
              (X) -> fnum(X, 1)
           end,
    case Anchor of
        none ->
            Met = case V of
                      none -> "n/a";
                      starved -> yes_no(false);
                      _ -> yes_no(Check(V))
                  end,
            [Label, Want, Cell(V), "", "", Met];
        _ ->
            A = value(Results, Anchor, Metric, Field),
            case {V, A} of
                {X, Y} when is_number(X), is_number(Y), Y > 0 ->
                    R = X / Y,
                    [Label, Want, Cell(X), column_name(Anchor) ++ " " ++ Cell(Y),
                     fnum(R, 2) ++ "x", yes_no(Check(R))];
                {X, starved} when is_number(X), Field =:= p99_us ->
                    %% the anchor's p99 is above the starvation bound, so the true ratio
                    %% is below X / bound: enough to pass an upper-bound target, if it is
                    Bound = X / (?STARVE_MS * 1000),
                    [Label, Want, Cell(X), column_name(Anchor) ++ " starved",
                     "< " ++ fnum(Bound, 2) ++ "x",
                     case Check(Bound) of true -> yes_no(true); false -> "n/a" end];
                {starved, Y} when is_number(Y), Y > 0, Field =:= p99_us ->
                    %% trust's p99 is above the bound, so the true ratio is above
                    %% bound / Y: enough to fail an upper-bound target, if it is
                    Bound = ?STARVE_MS * 1000 / Y,
                    [Label, Want, "starved", column_name(Anchor) ++ " " ++ Cell(Y),
                     "> " ++ fnum(Bound, 2) ++ "x",
                     case Check(Bound) of false -> yes_no(false); true -> "n/a" end];
                _ ->
                    [Label, Want, Cell(V), column_name(Anchor) ++ " " ++ Cell(A), "n/a", "n/a"]
            end
    end.

yes_no(true) -> "yes";
yes_no(false) -> "**no**".

%%% A plot of the run: one panel per metric, a bar per carrier, written as SVG (no
%%% plotting library needed) to docs/bench.svg for the README.

plot_panels() ->
    [{"1 MiB throughput (MB/s, higher is better)", tput_1m, mb_per_s},
     {"64 KiB throughput (MB/s, higher is better)", tput_64k, mb_per_s},
     {"small-message RTT p50 (µs, lower is better)", rtt, p50_us},
     {"100 B messages/s, 4 senders (higher is better)", rate_100b, msgs_per_s},
     {"ping p99 under 1 MiB bulk (ms, lower is better)", load_ping, p99_us},
     {"1 % loss, 50 ms RTT: ping p99 during bulk (ms, lower is better)", loss_ping, p99_us},
     {"CPU seconds per GB, both nodes (lower is better)", tput_1m, cpu_total_s_per_gb}].

render_svg(Results, Meta) ->
    Carriers = [C || {C, _} <- Results],
    PanelH = 34 + 22 * length(Carriers),
    W = 760,
    H = 40 + PanelH * length(plot_panels()),
    Colors = #{inet_tcp => "#7f7f7f", inet_tls => "#d62728", trust => "#1f77b4",
               trust_restricted => "#17becf", raw_quinn => "#2ca02c"},
    #{date := Date, otp_release := Otp, cpus := Cpus, mode := Mode} = Meta,
    Panels =
        [begin
             Y0 = 40 + I * PanelH,
             Vals = [{C, plot_value(Results, C, M, F)} || C <- Carriers],
             Max = lists:max([1.0e-9 | [V || {_, V} <- Vals, is_number(V)]]),
             [svg_text(10, Y0 + 18, Title, "bold"),
              [begin
                   Y = Y0 + 26 + J * 22,
                   Label = svg_text(10, Y + 14, column_name(C), ""),
                   case V of
                       starved ->
                           [Label, svg_text(160, Y + 14, "starved (no reply within 10 s)", "")];
                       none ->
                           [Label, svg_text(160, Y + 14, "n/a", "")];
                       {na, Why} ->
                           [Label, svg_text(160, Y + 14, "n/a: " ++ Why, "")];
                       _ ->
                           Len = max(1, round(480 * V / Max)),
                           [Label,
                            io_lib:format("<rect x=\"160\" y=\"~b\" width=\"~b\" height=\"16\" "
                                          "fill=\"~s\"/>~n", [Y + 2, Len, maps:get(C, Colors, "#999")]),
                            svg_text(166 + Len, Y + 14,
                                     if V >= 1000 -> fnum(V, 0); true -> fnum(V, 1) end, "")]
                   end
               end || {J, {C, V}} <- lists:zip(lists:seq(0, length(Vals) - 1), Vals)]]
         end || {I, {Title, M, F}} <- lists:zip(lists:seq(0, length(plot_panels()) - 1),
                                                plot_panels())],
    unicode:characters_to_binary(
      [io_lib:format("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"~b\" height=\"~b\" "
                     "font-family=\"sans-serif\" font-size=\"12\">~n", [W, H]),
       "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
       svg_text(10, 22, io_lib:format("make bench (~s mode): OTP ~s, ~b CPUs, loopback, ~ts",
                                      [Mode, Otp, Cpus, Date]), "bold"),
       Panels,
       "</svg>\n"]).

plot_value(Results, C, M, p99_us) when M =:= load_ping; M =:= loss_ping ->
    case {value(Results, C, M, p99_us), lists:keyfind(C, 1, Results)} of
        {none, {_, #{M := {ok, #{na := Why}}}}} -> {na, binary_to_list(Why)};
        {V, _} when is_number(V) -> V / 1000;
        {Other, _} -> Other
    end;
plot_value(Results, C, M, F) ->
    value(Results, C, M, F).

svg_text(X, Y, Text, Weight) ->
    Escaped = lists:flatmap(fun($<) -> "&lt;"; ($>) -> "&gt;"; ($&) -> "&amp;"; (Ch) -> [Ch] end,
                            unicode:characters_to_list(io_lib:format("~ts", [Text]))),
    W = case Weight of "" -> ""; _ -> " font-weight=\"" ++ Weight ++ "\"" end,
    io_lib:format("<text x=\"~b\" y=\"~b\"~s>~ts</text>~n", [X, Y, W, Escaped]).

write_results(#{out := Out}, Table, Results, Meta) ->
    ok = filelib:ensure_path(Out),
    Md = filename:join(Out, "latest.md"),
    Json = filename:join(Out, "latest.json"),
    ok = file:write_file(Md, Table),
    Doc = #{meta => Meta,
            carriers => maps:from_list([{C, R} || {C, R} <- Results])},
    ok = file:write_file(Json, [json(Doc), "\n"]),
    Svg = filename:join(Out, "latest.svg"),
    ok = file:write_file(Svg, render_svg(Results, Meta)),
    log("wrote ~ts, ~ts and ~ts", [Md, Json, Svg]).

%% Minimal JSON encoder: maps, lists, binaries/strings, numbers, atoms, {ok|error, _}.
json({ok, V}) -> json(V);
json({error, E}) -> json(#{error => iolist_to_binary(io_lib:format("~ts", [E]))});
json(M) when is_map(M) ->
    ["{", lists:join(",", [[json_key(K), ":", json(V)] || {K, V} <- lists:sort(maps:to_list(M))]), "}"];
json(true) -> "true";
json(false) -> "false";
json(undefined) -> "null";
json(null) -> "null";
json(A) when is_atom(A) -> json_str(atom_to_binary(A));
json(B) when is_binary(B) -> json_str(B);
json(I) when is_integer(I) -> integer_to_list(I);
json(F) when is_float(F) -> float_to_list(F, [{decimals, 6}, compact]);
json(L) when is_list(L) ->
    case io_lib:printable_unicode_list(L) andalso L =/= [] of
        true -> json_str(unicode:characters_to_binary(L));
        false -> ["[", lists:join(",", [json(E) || E <- L]), "]"]
    end;
json(T) -> json_str(list_to_binary(fmt("~0p", [T]))).

json_key(K) when is_atom(K) -> json_str(atom_to_binary(K));
json_key(K) when is_binary(K) -> json_str(K);
json_key(K) -> json_str(list_to_binary(fmt("~0p", [K]))).

json_str(B) ->
    [$", [json_char(C) || <<C/utf8>> <= B], $"].

json_char($") -> "\\\"";
json_char($\\) -> "\\\\";
json_char($\n) -> "\\n";
json_char($\r) -> "\\r";
json_char($\t) -> "\\t";
json_char(C) when C < 32 -> io_lib:format("\\u~4.16.0b", [C]);
json_char(C) -> <<C/utf8>>.

%%% Helpers

fmt(F, A) -> lists:flatten(io_lib:format(F, A)).

brief(_, {error, E}) -> "FAILED: " ++ truncate(E, 300);
brief(setup, {ok, #{median_ms := M, samples_ms := S}}) -> fmt("median ~.2f ms ~0p", [float(M), S]);
brief(reconnect, {ok, #{median_ms := M, samples_ms := S}}) -> fmt("median ~.2f ms ~0p", [float(M), S]);
brief(rtt, {ok, #{p50_us := P50, p99_us := P99, n := N,
                  in_place := #{writes := W, sent := S, packets_out := P}}}) ->
    fmt("p50 ~.1f us, p99 ~.1f us (n=~b; of A's ~b packets, ~b written and ~b sent "
        "on the sending scheduler)", [P50, P99, N, P, W, S]);
brief(rtt, {ok, #{p50_us := P50, p99_us := P99, n := N}}) ->
    fmt("p50 ~.1f us, p99 ~.1f us (n=~b)", [P50, P99, N]);
brief(loss_ping, {ok, #{na := Why}}) -> "n/a: " ++ binary_to_list(Why);
brief(loss_ping, R) -> brief(load_ping, R);
brief(load_ping, {ok, #{starved := true} = M}) ->
    fmt("STARVED after ~b pings; ~0p", [maps:get(n, M, 0), M]);
brief(load_ping, {ok, #{p50_us := P50, p99_us := P99, n := N} = M}) ->
    fmt("p50 ~.1f us, p99 ~.1f us (n=~b), bulk ~s MB/s", [P50, P99, N,
                                                       case M of #{bulk_mb_per_s := V} -> fnum(V, 0); _ -> "?" end]);
brief(rate_100b, {ok, #{msgs_per_s := R, messages := N}}) -> fmt("~s msg/s (~b msgs)", [group(round(R)), N]);
brief(_, {ok, #{mb_per_s := R, bytes := B, seconds := S} = M}) ->
    fmt("~.1f MB/s (~b MB in ~.2f s), CPU A ~.2f s B ~.2f s", [R, B div 1000000, S,
                                                              float(maps:get(cpu_sender_s, M)),
                                                              float(maps:get(cpu_receiver_s, M))]);
brief(_, {ok, M}) -> fmt("~0p", [M]).

log(F, A) ->
    {{_, _, _}, {H, Mi, S}} = calendar:local_time(),
    io:format("[~2..0b:~2..0b:~2..0b] " ++ F ++ "~n", [H, Mi, S | A]).
