%% @doc Signal ordering between process pairs across a link, under concurrent load.
%%
%% Erlang promises that the signals one process sends another arrive in the order sent,
%% whatever else is on the wire: messages to a pid, to a registered name and to an alias
%% of the same receiver; the exit and monitor signals of a sender's death after its last
%% message; a spawn reply before the spawned child's first message. A carrier that sends
%% packets of one link on several streams (lanes, to keep small messages from waiting
%% behind bulk data) keeps that promise only by construction; this module checks it
%% end to end, with mixed message sizes so that small and bulk packets interleave.
%%
%% Everything here runs on the node that drives (the sending side); the processes on the
%% remote node are spawned from here. Every wait is bounded.
-module(trust_dist_order).

-export([pairs/3, name_monitor_exits/3, spawn_replies/3, ping_under_bulk/3]).

-define(BIG, 256 * 1024).
-define(MEDIUM, 8 * 1024).

%% Senders here, receivers on Remote; every sender sends Count messages spread over all
%% receivers, cycling through the three ways to address one (pid, {Name, Node}, alias)
%% and through small, medium and big payloads, then exits with the count it sent each
%% receiver as its reason. Each sender links to its receivers (a link made by this side,
%% so it works on a restricted link too); receivers trap exits and, when asked, also
%% monitor the sender. A receiver checks per sender: sequence numbers one by one without
%% gap or repeat, and the exit and DOWN signals only after the last message.
%%
%% Returns {ok, #{messages => N, bytes => B, receivers => R}} or {error, Violations}.
pairs(Remote, Opts, Timeout) ->
    NSenders = maps:get(senders, Opts, 8),
    NReceivers = maps:get(receivers, Opts, 8),
    Count = maps:get(count, Opts, 2000),
    Monitor = maps:get(monitor, Opts, true),
    Deadline = deadline(Timeout),
    Tag = erlang:unique_integer([positive]),
    Receivers = [start_receiver(Remote, Tag, I, Monitor, Deadline)
                 || I <- lists:seq(1, NReceivers)],
    Self = self(),
    Senders = [spawn(fun() -> sender(Self, Remote, Receivers, Count, I) end)
               || I <- lists:seq(1, NSenders)],
    [S ! go || S <- Senders],
    Sent = [receive {sent, S, Counted, Bytes} -> {Counted, Bytes}
            after left(Deadline) -> error({sender_timeout, S})
            end || S <- Senders],
    %% Every receiver reports once it has seen each sender's exit (so all it will get).
    Reports = [receiver_report(R, NSenders, Deadline) || R <- Receivers],
    Violations = lists:append([Bad || {_, Bad} <- Reports]),
    Messages = lists:sum([N || {N, _} <- Reports]),
    Expected = lists:sum([lists:sum(maps:values(C)) || {C, _} <- Sent]),
    Bytes = lists:sum([B || {_, B} <- Sent]),
    case {Violations, Messages} of
        {[], Expected} ->
            {ok, #{messages => Messages, bytes => Bytes, receivers => NReceivers,
                   senders => NSenders}};
        {[], _} ->
            {error, [{received, Messages, expected, Expected}]};
        _ ->
            {error, lists:sublist(Violations, 20)}
    end.

start_receiver(Remote, Tag, I, Monitor, Deadline) ->
    Self = self(),
    Name = list_to_atom("trust_dist_order_" ++ integer_to_list(Tag) ++ "_"
                        ++ integer_to_list(I)),
    Pid = spawn(Remote, fun() -> receiver_init(Self, Name, Monitor) end),
    receive
        {receiver, Pid, Alias} -> {Pid, Name, Alias}
    after left(Deadline) -> error({receiver_timeout, Remote})
    end.

receiver_init(Owner, Name, Monitor) ->
    true = register(Name, self()),
    process_flag(trap_exit, true),
    Alias = alias(),
    Owner ! {receiver, self(), Alias},
    receiver_loop(#{owner => Owner, monitor => Monitor, next => #{}, ended => #{},
                    got => 0, bad => [], report => none}).

receiver_loop(#{next := Next, bad := Bad, got := Got} = S) ->
    receive
        {watch, Sender} ->
            _ = case S of
                    #{monitor := true} -> monitor(process, Sender);
                    #{} -> ok
                end,
            Sender ! {watching, self()},
            receiver_loop(S);
        {seq, Sender, K, _Payload} ->
            Want = maps:get(Sender, Next, 1),
            Bad1 = case K of
                       Want -> Bad;
                       _ -> [{out_of_order, Sender, self(), expected, Want, got, K} | Bad]
                   end,
            receiver_loop(S#{next := Next#{Sender => K + 1}, bad := Bad1, got := Got + 1});
        {'EXIT', Sender, {done, Counts}} ->
            maybe_report(ended(exit, Sender, Counts, S));
        {'DOWN', _, process, Sender, {done, Counts}} ->
            maybe_report(ended(down, Sender, Counts, S));
        {'EXIT', Sender, Other} ->
            receiver_loop(S#{bad := [{unexpected_exit, Sender, Other} | Bad]});
        {'DOWN', _, process, Sender, Other} ->
            receiver_loop(S#{bad := [{unexpected_down, Sender, Other} | Bad]});
        {report, To, Senders} ->
            maybe_report(S#{report := {To, Senders}})
    end.

%% Answers the report request once every sender has ended (its exit, and its DOWN when
%% monitored): then nothing more can come, and the receiver is done.
maybe_report(#{report := {To, Senders}, ended := Ended, got := Got, bad := Bad} = S) ->
    Signals = case S of #{monitor := true} -> 2; #{} -> 1 end,
    case length([1 || N <- maps:values(Ended), N >= Signals]) >= Senders of
        true -> To ! {report, self(), Got, lists:reverse(Bad)};
        false -> receiver_loop(S)
    end;
maybe_report(S) ->
    receiver_loop(S).

%% A sender's exit (link) or DOWN (monitor) must come after every message it sent us.
ended(Kind, Sender, Counts, #{next := Next, bad := Bad, ended := Ended} = S) ->
    Sent = maps:get(self(), Counts, 0),
    Seen = maps:get(Sender, Next, 1) - 1,
    Bad1 = case Seen of
               Sent -> Bad;
               _ -> [{Kind, before_last_message, Sender, seen, Seen, sent, Sent} | Bad]
           end,
    S#{bad := Bad1, ended := Ended#{Sender => maps:get(Sender, Ended, 0) + 1}}.

receiver_report({Pid, _, _}, Senders, Deadline) ->
    Pid ! {report, self(), Senders},
    receive {report, Pid, Got, Bad} -> {Got, Bad}
    after left(Deadline) -> {0, [{report_timeout, Pid}]}
    end.

sender(Owner, Remote, Receivers, Count, I) ->
    receive go -> ok end,
    %% Link to every receiver (from this side) and let it watch us before the first
    %% message, so that its exit and DOWN checks cover the whole sequence.
    [begin link(P), P ! {watch, self()} end || {P, _, _} <- Receivers],
    [receive {watching, P} -> ok after 30000 -> exit(not_watched) end
     || {P, _, _} <- Receivers],
    N = length(Receivers),
    RT = list_to_tuple(Receivers),
    {Counts, Bytes} = send_loop(Remote, RT, N, Count, I, 1, #{}, 0),
    Owner ! {sent, self(), Counts, Bytes},
    exit({done, Counts}).

send_loop(_Remote, _RT, _N, Count, _I, J, Counts, Bytes) when J > Count ->
    {Counts, Bytes};
send_loop(Remote, RT, N, Count, I, J, Counts, Bytes) ->
    {Pid, Name, Alias} = element(1 + (J + I) rem N, RT),
    K = maps:get(Pid, Counts, 0) + 1,
    Payload = payload(I, J),
    Msg = {seq, self(), K, Payload},
    case (J div N) rem 3 of
        0 -> Pid ! Msg;
        1 -> {Name, Remote} ! Msg;
        2 -> Alias ! Msg
    end,
    send_loop(Remote, RT, N, Count, I, J + 1, Counts#{Pid => K}, Bytes + byte_size(Payload)).

%% Mostly small, some medium, a few big: the bulk packets a lane design would want to
%% move out of the way of the small ones.
payload(I, J) when (I + J) rem 97 =:= 0 -> binary:copy(<<I:8>>, ?BIG);
payload(I, J) when (I + J) rem 11 =:= 0 -> binary:copy(<<J:8>>, ?MEDIUM);
payload(_I, J) -> <<J:64>>.

%% N processes on Remote, each registered under a name this node monitors by that name,
%% send us K messages (the last one big) and exit: each DOWN, whose sender the protocol
%% names by the registered name, not the pid, must come after all K messages.
name_monitor_exits(Remote, N, Timeout) ->
    Deadline = deadline(Timeout),
    Self = self(),
    Checkers = [spawn_link(fun() -> Self ! {name_case, self(), name_case(Remote, I, Deadline)} end)
                || I <- lists:seq(1, N)],
    Results = [receive {name_case, C, R} -> R after left(Deadline) -> {timeout, C} end
               || C <- Checkers],
    case [R || R <- Results, R =/= ok] of
        [] -> ok;
        Bad -> {error, Bad}
    end.

name_case(Remote, I, Deadline) ->
    Self = self(),
    K = 20 + I rem 7,
    Name = list_to_atom("trust_dist_order_named_" ++
                        integer_to_list(erlang:unique_integer([positive]))),
    Pid = spawn(Remote, fun() ->
                                true = register(Name, self()),
                                Self ! {registered, self()},
                                receive {go, To} -> ok end,
                                [To ! {named, J, payload(I, J)} || J <- lists:seq(1, K - 1)],
                                To ! {named, K, binary:copy(<<K:8>>, ?BIG)},
                                exit(done)
                        end),
    receive {registered, Pid} -> ok after left(Deadline) -> exit(not_registered) end,
    Ref = monitor(process, {Name, Remote}),
    Pid ! {go, self()},
    name_collect(Ref, 1, K, Deadline).

name_collect(Ref, Next, K, Deadline) ->
    receive
        {named, Next, _} -> name_collect(Ref, Next + 1, K, Deadline);
        {named, Other, _} -> {out_of_order, expected, Next, got, Other};
        {'DOWN', Ref, process, _, done} when Next =:= K + 1 -> ok;
        {'DOWN', Ref, process, _, Why} -> {down_before_messages, Next - 1, of_, K, Why}
    after left(Deadline) -> {timeout, Next - 1, of_, K}
    end.

%% N spawn requests to Remote whose children message us at once: the spawn reply must
%% reach us before the child's first message.
spawn_replies(Remote, N, Timeout) ->
    Deadline = deadline(Timeout),
    Self = self(),
    Reqs = [spawn_request(Remote,
                          fun() ->
                                  [Self ! {child, self(), J, payload(J, J)} || J <- lists:seq(1, 5)]
                          end, [{reply, yes}])
            || _ <- lists:seq(1, N)],
    Bad = spawn_collect(Reqs, #{}, Deadline, []),
    case Bad of
        [] -> ok;
        _ -> {error, lists:sublist(Bad, 10)}
    end.

%% Takes the first message that is a spawn reply or a child's message, in mailbox order:
%% a child whose messages come before we know its pid is a reordering.
spawn_collect([], _Children, _Deadline, Bad) ->
    Bad;
spawn_collect(Reqs, Children, Deadline, Bad) ->
    receive
        {spawn_reply, Req, ok, Pid} ->
            spawn_collect(lists:delete(Req, Reqs), Children#{Pid => Req}, Deadline, Bad);
        {spawn_reply, Req, error, Why} ->
            spawn_collect(lists:delete(Req, Reqs), Children, Deadline,
                          [{spawn_failed, Why} | Bad]);
        {child, Pid, J, _} when not is_map_key(Pid, Children) ->
            spawn_collect(Reqs, Children, Deadline, [{child_before_reply, Pid, J} | Bad]);
        {child, _, _, _} ->
            spawn_collect(Reqs, Children, Deadline, Bad)
    after left(Deadline) -> [{spawn_reply_timeout, length(Reqs)} | Bad]
    end.

deadline(Timeout) -> erlang:monotonic_time(millisecond) + Timeout.

left(Deadline) -> max(0, Deadline - erlang:monotonic_time(millisecond)).

%% While one process here streams Size-byte binaries to a sink on Remote as fast as the
%% link takes them, another does round trips to an echo there, for Ms. The senders share
%% one busy connection: the pinger must get its turn. Returns {Pings, MaxMicros, BulkMB}.
ping_under_bulk(Remote, Size, Ms) ->
    Sink = spawn(Remote, fun() -> sink(0) end),
    Echo = spawn(Remote, fun Echo() -> receive {ping, From} -> From ! pong, Echo(); stop -> ok end end),
    Bin = binary:copy(<<7>>, Size),
    Bulk = spawn(fun() -> bulk(Sink, Bin) end),
    timer:sleep(200),
    %% The pinger, like the bulk sender, is a fresh process of this one: they share a run
    %% queue, the case in which a bulk sender resumed first always wins.
    Self = self(),
    Deadline = erlang:monotonic_time(millisecond) + Ms,
    Pinger = spawn(fun() -> Self ! {pinged, self(), pings(Echo, Deadline, 0, 0)} end),
    {Pings, Max} = receive {pinged, Pinger, R} -> R after Ms + 35000 -> {0, infinity} end,
    exit(Pinger, kill),
    exit(Bulk, kill),
    Sink ! {count, self()},
    Bytes = receive {count, N} -> N after 30000 -> 0 end,
    Echo ! stop,
    Sink ! stop,
    {Pings, Max, Bytes div 1000000}.

bulk(Sink, Bin) ->
    Sink ! Bin,
    bulk(Sink, Bin).

sink(N) ->
    receive
        B when is_binary(B) -> sink(N + byte_size(B));
        {count, From} -> From ! {count, N}, sink(N);
        stop -> ok
    end.

%% Round trips until Deadline; one that takes past it still counts (its time is the
%% measure of the starvation this guards against).
pings(Echo, Deadline, N, Max) ->
    case erlang:monotonic_time(millisecond) < Deadline of
        false -> {N, Max};
        true ->
            T = erlang:monotonic_time(microsecond),
            Echo ! {ping, self()},
            receive pong -> ok after 30000 -> ok end,
            pings(Echo, Deadline, N + 1, max(Max, erlang:monotonic_time(microsecond) - T))
    end.
