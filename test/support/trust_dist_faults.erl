%% Test-only traffic for the fault-injection suite (test/faults_test.exs): numbered
%% sequences per sender->receiver pair, receivers that classify every arrival (next,
%% gap, duplicate, late), and a node-event recorder on wall-clock time so figures from
%% two VMs can be compared. Runs on the nodes under test; Erlang, no Elixir needed.
-module(trust_dist_faults).

%% A sender stops sending after this long even if never told to stop.
-define(MAX_SENDING_MS, 120000).

-export([start_receivers/1, receiver_reports/2, start_senders/4, stop_senders/2,
         watch/0, events/0, park/0, ping_until/2]).

%% ---------------------------------------------------------------------------
%% Receivers

%% N receivers on this node; returns their pids.
start_receivers(N) ->
    [spawn(fun() -> receiver(#{}) end) || _ <- lists:seq(1, N)].

%% Per pair: next expected sequence number, counters, the gaps seen (so a late arrival
%% can be told from a duplicate), the last number the sender says it sent.
-record(pair, {next = 1, got = 0, bytes = 0, gaps = [], missing = 0, dups = 0, late = 0,
               last_sent, first_at, last_at, max_idle = 0}).

receiver(Pairs) ->
    receive
        {seq, Key, Seq, Payload} ->
            Now = now_ms(),
            P0 = maps:get(Key, Pairs, #pair{first_at = Now, last_at = Now}),
            %% The longest wait between two arrivals: how long the pair stalled.
            Idle = max(P0#pair.max_idle, Now - P0#pair.last_at),
            P1 = P0#pair{got = P0#pair.got + 1, bytes = P0#pair.bytes + byte_size(Payload),
                         last_at = Now, max_idle = Idle},
            receiver(Pairs#{Key => arrive(Seq, P1)});
        {done, Key, Last} ->
            Now = now_ms(),
            P0 = maps:get(Key, Pairs, #pair{first_at = Now, last_at = Now}),
            receiver(Pairs#{Key => P0#pair{last_sent = Last}});
        {report, From, Ref} ->
            From ! {Ref, self(), maps:map(fun(_, P) -> summary(P) end, Pairs)},
            receiver(Pairs);
        stop -> ok
    after 600000 -> ok                               % never outlive a forgotten test
    end.

arrive(Seq, #pair{next = Seq} = P) ->
    P#pair{next = Seq + 1};
arrive(Seq, #pair{next = Next} = P) when Seq > Next ->
    P#pair{next = Seq + 1, gaps = [{Next, Seq - 1} | P#pair.gaps],
           missing = P#pair.missing + Seq - Next};
arrive(Seq, P) ->
    %% Behind the next expected number: either it fills a gap (it was overtaken: a
    %% reorder) or it was delivered before (a duplicate). Both are failures.
    case [G || {From, To} = G <- P#pair.gaps, Seq >= From, Seq =< To] of
        [] -> P#pair{dups = P#pair.dups + 1};
        _ -> P#pair{late = P#pair.late + 1}
    end.

summary(P) ->
    #{got => P#pair.got, bytes => P#pair.bytes, next => P#pair.next,
      gaps => lists:reverse(P#pair.gaps), missing => P#pair.missing, dups => P#pair.dups,
      late => P#pair.late, last_sent => P#pair.last_sent, first_at => P#pair.first_at,
      last_at => P#pair.last_at, max_idle => P#pair.max_idle}.

%% Waits until every receiver knows the last number of Expected pairs (their done
%% markers arrived) and has everything up to it, or TimeoutMs pass; returns the merged
%% reports (#{PairKey => Summary}, PairKey = {SenderNode, SenderIndex, ReceiverPid}).
receiver_reports(Receivers, {Expected, TimeoutMs}) ->
    Deadline = now_ms() + TimeoutMs,
    reports_until(Receivers, Expected, Deadline).

reports_until(Receivers, Expected, Deadline) ->
    Reports = maps:from_list(
                lists:append([[{{SNode, SIdx, R}, S} || {{SNode, SIdx}, S} <- maps:to_list(report(R))]
                              || R <- Receivers])),
    Complete = [K || {K, #{last_sent := L, next := N}} <- maps:to_list(Reports),
                     is_integer(L), N > L],
    case length(Complete) >= Expected orelse now_ms() > Deadline of
        true -> Reports;
        false -> timer:sleep(100), reports_until(Receivers, Expected, Deadline)
    end.

report(R) ->
    Ref = make_ref(),
    R ! {report, self(), Ref},
    receive {Ref, R, Map} -> Map after 5000 -> #{} end.

%% ---------------------------------------------------------------------------
%% Senders

%% N senders on this node; each sends, round robin over Receivers, a numbered sequence
%% per receiver, PerSecond messages a second in 10 ms batches, each carrying Size bytes,
%% until told to stop. Returns their pids.
start_senders(Receivers, N, PerSecond, Size) ->
    Payload = binary:copy(<<"x">>, Size),
    Batch = max(1, PerSecond div 100),
    [spawn(fun() ->
                   process_flag(message_queue_data, off_heap),
                   Seqs = maps:from_list([{R, 0} || R <- Receivers]),
                   Until = now_ms() + ?MAX_SENDING_MS,
                   sender({node(), I}, Receivers, Seqs, Batch, Payload, now_ms(), Until)
           end)
     || I <- lists:seq(1, N)].

sender(Key, Receivers, Seqs, Batch, Payload, Tick, Until) ->
    %% Past Until (a test that never said stop) the sender only waits, then ends.
    Wait = case Tick > Until of
               true -> ?MAX_SENDING_MS;
               false -> max(0, Tick - now_ms())
           end,
    receive
        {stop, From, Ref} ->
            [R ! {done, Key, Last} || {R, Last} <- maps:to_list(Seqs)],
            From ! {Ref, self(), Key, Seqs}
    after Wait ->
            case Tick > Until of
                true -> ok;
                false ->
                    Seqs1 = send_batch(Key, Receivers, Seqs, Batch, Payload),
                    %% Behind schedule (the link pushed back): no catching up in a burst.
                    Next = max(Tick + 10, now_ms()),
                    sender(Key, Receivers, Seqs1, Batch, Payload, Next, Until)
            end
    end.

send_batch(_Key, _Receivers, Seqs, 0, _Payload) -> Seqs;
send_batch(Key, [R | Rest], Seqs, Left, Payload) ->
    Seq = maps:get(R, Seqs) + 1,
    R ! {seq, Key, Seq, Payload},
    send_batch(Key, Rest ++ [R], Seqs#{R := Seq}, Left - 1, Payload).

%% Stops the senders (each first sends its done markers); returns
%% #{{SenderNode, SenderIndex, ReceiverPid} => LastSeq}, or {timeout, Left, SoFar}.
stop_senders(Senders, TimeoutMs) ->
    Ref = make_ref(),
    [S ! {stop, self(), Ref} || S <- Senders],
    Deadline = now_ms() + TimeoutMs,
    collect_stops(Senders, Ref, Deadline, #{}).

collect_stops([], _Ref, _Deadline, Acc) -> Acc;
collect_stops(Senders, Ref, Deadline, Acc) ->
    receive
        {Ref, S, {Node, I}, Seqs} ->
            Acc1 = maps:fold(fun(R, L, A) -> A#{{Node, I, R} => L} end, Acc, Seqs),
            collect_stops(lists:delete(S, Senders), Ref, Deadline, Acc1)
    after max(0, Deadline - now_ms()) ->
            {timeout, Senders, Acc}
    end.

%% ---------------------------------------------------------------------------
%% Node events and helpers

%% Records nodeup/nodedown of this node with wall-clock milliseconds (comparable across
%% the VMs of one machine, unlike monotonic time).
watch() ->
    case whereis(trust_dist_faults_watch) of
        undefined -> ok;
        Old -> exit(Old, kill)
    end,
    Self = self(),
    Pid = spawn(fun() ->
                        ok = net_kernel:monitor_nodes(true, [nodedown_reason]),
                        Self ! {watching, self()},
                        watch_loop([])
                end),
    receive {watching, Pid} -> ok after 5000 -> error(watch_not_started) end,
    register(trust_dist_faults_watch, Pid),
    ok.

watch_loop(Events) ->
    receive
        {get, From, Ref} -> From ! {Ref, lists:reverse(Events)}, watch_loop(Events);
        {nodeup, Node, _} -> watch_loop([{now_ms(), nodeup, Node, undefined} | Events]);
        {nodedown, Node, Info} ->
            Reason = proplists:get_value(nodedown_reason, Info),
            watch_loop([{now_ms(), nodedown, Node, Reason} | Events])
    end.

%% [{WallMs, nodeup | nodedown, Node, Reason}] in order.
events() ->
    Ref = make_ref(),
    trust_dist_faults_watch ! {get, self(), Ref},
    receive {Ref, E} -> E after 5000 -> error(no_watcher) end.

park() ->
    spawn(fun() -> receive stop -> ok end end).

%% Pings Node every 100 ms until pong or TimeoutMs pass; returns {pong, WallMs, Pangs}
%% (the failed attempts before) or pang.
ping_until(Node, TimeoutMs) ->
    Deadline = now_ms() + TimeoutMs,
    ping_loop(Node, Deadline, 0).

ping_loop(Node, Deadline, Pangs) ->
    case net_adm:ping(Node) of
        pong -> {pong, now_ms(), Pangs};
        pang ->
            case now_ms() > Deadline of
                true -> pang;
                false -> timer:sleep(100), ping_loop(Node, Deadline, Pangs + 1)
            end
    end.

now_ms() -> erlang:system_time(millisecond).
