%% @doc The processes of one distribution connection over trust_dist.
%%
%% Per link, all linked together:
%% <ul>
%% <li>the <b>supervisor</b> (spawned by `setup/accept_connection' with
%%     `dist_util:net_ticker_spawn_options()'): runs the `dist_util' handshake over the
%%     verified link, then becomes the ticker;</li>
%% <li>the <b>controller</b>, registered with the VM as the distribution controller: after
%%     the handshake it drains `dist_ctrl_get_data' into the NIF, which puts each packet
%%     on the lane (QUIC stream) of its sending process. A process whose lane is above its
%%     high-water mark is suspended until the lane drains, the others go on; only when
%%     the whole link's queue is above its mark does the controller stop (the VM then
%%     makes every sender wait, as for a busy TCP port);</li>
%% <li>the <b>input handler</b>: hands packet batches from the NIF to
%%     `dist_ctrl_put_data' and returns credit, so the transport reads no more than the VM
%%     takes.</li>
%% </ul>
%% By the time any of these exist, the peer has proven its key in TLS, shown a
%% certificate from a trusted authority for that key and (when it dialled us) claimed a
%% node name its certificate covers; see the net crate.
-module(trust_dist_link).

-export([setup/6, accept_connection/6, resolve_host/1]).
-export([do_setup/7, do_accept/7, controller/2, input_handler/3]).

-include_lib("kernel/include/net_address.hrl").
-include_lib("kernel/include/dist.hrl").
-include_lib("kernel/include/dist_util.hrl").

%% What the f_* funs of #hs_data{} get as their "socket".
-record(sock, {ctrl :: pid(), link :: reference(), info :: map()}).
%% The controller's state once data flows: processes it suspended, by pid.
-record(out, {node :: node(), dhandle :: term(), link :: reference(),
              paused = #{} :: #{pid() => true}}).

-define(SPAWN_OPTS, [link, {message_queue_data, off_heap}]).
%% Packets drained from the VM per NIF call, and roughly how many bytes.
-define(BATCH_PACKETS, 64).
-define(BATCH_BYTES, 1024 * 1024).

setup(Kernel, Node, Type, MyNode, LongOrShortNames, SetupTime) ->
    spawn_opt(?MODULE, do_setup, [Kernel, Node, Type, MyNode, LongOrShortNames, SetupTime, self()],
              dist_util:net_ticker_spawn_options()).

accept_connection(Kernel, Acceptor, Link, MyNode, Allowed, SetupTime) ->
    spawn_opt(?MODULE, do_accept, [Kernel, Acceptor, Link, MyNode, Allowed, SetupTime, self()],
              dist_util:net_ticker_spawn_options()).

%% @private
do_setup(Kernel, Node, Type, MyNode, _LongOrShortNames, SetupTime, _Caller) ->
    Timer = dist_util:start_timer(SetupTime),
    case resolve(Node) of
        {ok, Ip, Port} ->
            dist_util:reset_timer(Timer),
            Carrier = trust_dist_server:carrier(),
            ok = trust_dist_nif:connect(Carrier, list_to_binary(inet:ntoa(Ip)), Port,
                                        atom_to_binary(Node), self()),
            receive
                {trust_dist_connected, Link, Info} ->
                    Sock = new_sock(Link, Info),
                    HSData = (hs_data(Sock))#hs_data{kernel_pid = Kernel,
                                                     other_node = Node,
                                                     this_node = MyNode,
                                                     timer = Timer,
                                                     other_version = ?ERL_DIST_VER_HIGH,
                                                     request_type = request_type(Info, Type)},
                    dist_util:handshake_we_started(HSData);
                {trust_dist_connect_failed, Why} ->
                    trust_dist_log:log(warning, "connection to ~p refused: ~ts", [Node, Why]),
                    ?shutdown2(Node, {trust_dist, Why})
            end;
        {error, Why} ->
            trust_dist_log:log(notice, "cannot reach ~p: ~tp", [Node, Why]),
            ?shutdown2(Node, Why)
    end.

%% @private
do_accept(Kernel, Acceptor, {trust_dist_link, Link, Info}, MyNode, Allowed, SetupTime, _Caller) ->
    receive
        {Acceptor, controller} ->
            Timer = dist_util:start_timer(SetupTime),
            Sock = new_sock(Link, Info),
            HSData = (hs_data(Sock))#hs_data{kernel_pid = Kernel,
                                             this_node = MyNode,
                                             timer = Timer,
                                             allowed = Allowed,
                                             request_type = request_type(Info, normal)},
            dist_util:handshake_other_started(HSData)
    end.

new_sock(Link, Info) ->
    Ctrl = spawn_opt(?MODULE, controller, [self(), Link],
                     [{priority, max} | ?SPAWN_OPTS]),
    #sock{ctrl = Ctrl, link = Link, info = Info}.

%% Where to find Node's UDP port: the static `ports' map, else the epmd module (which
%% also honours -erl_epmd_port).
resolve(Node) ->
    [Name, Host] = string:split(atom_to_list(Node), "@"),
    case resolve_host(Host) of
        {ok, Ip} ->
            #{ports := Ports} = trust_dist_server:config(),
            case maps:find(Node, Ports) of
                {ok, Port} -> {ok, Ip, Port};
                error ->
                    case (net_kernel:epmd_module()):port_please(Name, Ip) of
                        {port, Port, _Version} -> {ok, Ip, Port};
                        noport -> {error, {not_registered_in_epmd, Node}};
                        Other -> {error, {epmd, Other}}
                    end
            end;
        error ->
            {error, {unresolvable_host, Host}}
    end.

%% @doc The address of Host, IPv4 first; shared by select/1 and setup.
resolve_host(Host) ->
    case inet:getaddr(Host, inet) of
        {ok, Ip} -> {ok, Ip};
        {error, _} ->
            case inet:getaddr(Host, inet6) of
                {ok, Ip} -> {ok, Ip};
                {error, _} -> error
            end
    end.

%% No link negotiates the atom cache or fragments, so every packet is self-contained:
%% it decodes the same whichever lane (QUIC stream) brings it, which is what lets the
%% transport spread one connection's packets over several streams by sending process
%% (trust_dist_proto::lanes) and keep a bulk transfer from holding back everyone else.
%% On restricted links (the peer is below us) it also means a packet the filter drops
%% cannot change how a later one decodes, and no fragment state exists to bound. Either
%% side's rejection removes a feature in both directions. Links across tiers are hidden:
%% no `global' sync and no transitive mesh through a node of another tier.
-define(REJECT_FLAGS, (?DFLAG_DIST_HDR_ATOM_CACHE bor ?DFLAG_FRAGMENTS)).

hs_data(Sock) ->
    HSData = hs_data_funs(Sock),
    HSData#hs_data{reject_flags = ?REJECT_FLAGS}.

%% The connection type: hidden across tiers whatever net_kernel asked for.
request_type(#{cross_tier := true}, _Asked) -> hidden;
request_type(#{}, Asked) -> Asked.

hs_data_funs(#sock{ctrl = Ctrl, link = Link, info = Info} = Sock) ->
    #hs_data{socket = Sock,
             this_flags = 0,
             f_send = fun(_, Data) -> handshake_send(Link, Data) end,
             f_recv = fun(_, _Len, Timeout) -> handshake_recv(Link, Timeout) end,
             f_setopts_pre_nodeup = fun(_) -> ok end,
             f_setopts_post_nodeup = fun(_) -> ok end,
             f_getll = fun(_) -> {ok, Ctrl} end,
             f_address = fun(_, Node) -> net_address(Node, Info) end,
             f_handshake_complete = fun(_, Node, DHandle) -> handshake_complete(Sock, Node, DHandle) end,
             mf_tick = fun(_) -> trust_dist_nif:tick(Link) end,
             mf_getstat = fun(_) -> trust_dist_nif:getstat(Link) end,
             mf_setopts = fun(_, _) -> {error, enotsup} end,
             mf_getopts = fun(_, _) -> {error, enotsup} end}.

handshake_send(Link, Data) ->
    case trust_dist_nif:send(Link, [iolist_to_binary(Data)]) of
        ok -> ok;
        busy -> ok  % handshake messages are tiny; the queue drains on its own
    end.

%% dist_util wants one whole handshake message, as a list. The transport already holds
%% these to ?MAX_HANDSHAKE_MESSAGE bytes; the guard here is a second line.
-define(MAX_HANDSHAKE_MESSAGE, 2048).
handshake_recv(Link, Timeout) ->
    case trust_dist_nif:recv_handshake(Link) of
        ok ->
            receive
                {trust_dist_hs, Frame} when byte_size(Frame) =< ?MAX_HANDSHAKE_MESSAGE ->
                    {ok, binary_to_list(Frame)};
                {trust_dist_hs, _} ->
                    {error, oversized_handshake_message};
                {trust_dist_closed, Why} ->
                    {error, {closed, Why}}
            after Timeout ->
                {error, timeout}
            end;
        closed ->
            {error, closed}
    end.

net_address(Node, #{address := Address}) ->
    [_, Host] = string:split(atom_to_list(Node), "@"),
    #net_address{address = Address, host = Host, protocol = quic, family = inet}.

%% Called in the supervisor once the VM knows the node: hand the data phase to the
%% controller and the input handler, and wait until they own the link.
handshake_complete(#sock{ctrl = Ctrl, link = Link, info = Info}, Node, DHandle) ->
    Ref = erlang:monitor(process, Ctrl),
    Ctrl ! {self(), Ref, {handshake_complete, Node, DHandle}},
    receive
        {Ref, ok} ->
            erlang:demonitor(Ref, [flush]),
            trust_dist_server:register_link(Node, Ctrl, Link, Info),
            ok;
        {'DOWN', Ref, process, Ctrl, Reason} ->
            exit({controller_died, Reason})
    end.

%%% The controller (output side)

%% @private
%% The controller traps exits so that, whatever ends the connection (net_kernel's
%% disconnect, a tick timeout, a handshake failure), it closes the QUIC connection at
%% once and the peer learns of it now rather than when the link is garbage collected.
controller(Supervisor, Link) ->
    process_flag(trap_exit, true),
    receive
        {'EXIT', _, Reason} ->
            exit_closing(Link, Reason);
        {Supervisor, Ref, {handshake_complete, Node, DHandle}} ->
            Input = spawn_opt(?MODULE, input_handler, [self(), DHandle, Link], ?SPAWN_OPTS),
            ok = erlang:dist_ctrl_input_handler(DHandle, Input),
            false = erlang:dist_ctrl_set_opt(DHandle, get_size, true),
            %% If the link ended during the hand-over, its closed event went to the
            %% supervisor: these tell us instead, and the connection goes down now.
            ok = started(trust_dist_nif:set_owners(Link, Input, self()), Link),
            ok = started(trust_dist_nif:start_data(Link, term_to_binary(self()),
                                                   system_processes()), Link),
            %% High, as a port's drain would be: ERTS resumes the senders suspended on a
            %% busy connection in the order they were suspended, and only when this
            %% process takes data. At normal priority a bulk sender, resumed first,
            %% refills the queue before we run again, and a second sender on the same
            %% connection (a ping) is suspended anew every time, for as long as the bulk
            %% transfer lasts. Running ahead of normal processes, we drain between them.
            process_flag(priority, high),
            Supervisor ! {Ref, ok},
            erlang:dist_ctrl_get_data_notification(DHandle),
            output_loop(#out{node = Node, dhandle = DHandle, link = Link}, false)
    end.

output_loop(Out, Busy) ->
    receive
        dist_data when not Busy ->
            drain(Out);
        dist_data ->
            output_loop(Out, Busy);
        {trust_dist_writable} ->
            drain(Out);
        {trust_dist_resume, Pids} ->
            output_loop(resume(Pids, Out), Busy);
        {trust_dist_closed, Why} ->
            closed(Out#out.node, Why);
        {'EXIT', _, Reason} ->
            exit_closing(Out#out.link, Reason)
    end.

%% This node's system processes as the filter of a restricted link must know them: they
%% stay unreachable from a lower tier even if their pids were handed out.
system_processes() ->
    [{atom_to_binary(Name), term_to_binary(Pid)}
     || Name <- trust_dist_nif:system_process_names(), is_pid(Pid = whereis(Name))].

started(ok, _Link) -> ok;
started(closed, Link) -> exit_closing(Link, {shutdown, trust_dist_closed}).

exit_closing(Link, Reason) ->
    trust_dist_nif:close(Link, unicode:characters_to_binary(io_lib:format("~0tp", [Reason]))),
    exit(Reason).

drain(#out{dhandle = DHandle, link = Link} = Out) ->
    case collect(DHandle, ?BATCH_PACKETS, ?BATCH_BYTES, []) of
        {[], _} ->
            erlang:dist_ctrl_get_data_notification(DHandle),
            output_loop(Out, false);
        {Packets, More} ->
            {Status, Out1} = case trust_dist_nif:send(Link, Packets) of
                                 {S, Pids} -> {S, pause(Pids, Out)};
                                 S -> {S, Out}
                             end,
            case Status of
                ok when More -> drain(Out1);
                ok ->
                    erlang:dist_ctrl_get_data_notification(DHandle),
                    output_loop(Out1, false);
                busy ->
                    %% The VM keeps what we have not taken and suspends senders once its
                    %% buffer is full; {trust_dist_writable} resumes us.
                    output_loop(Out1, true)
            end
    end.

%% A process whose lane is over its high-water mark is suspended here, as the VM
%% suspends a sender on a busy connection, but alone: the connection stays open to every
%% other process, so a ping never waits behind someone else's bulk transfer. Suspensions
%% are asynchronous (this process never blocks on a sender), undone when the lane drains
%% ({trust_dist_resume, Pids}) and, by the VM, when this process exits with the link.
pause([], Out) ->
    Out;
pause([Pid | Rest], #out{paused = Paused} = Out) when Pid =:= self();
                                                      is_map_key(Pid, Paused) ->
    pause(Rest, Out);
pause([Pid | Rest], Out) when node(Pid) =/= node() ->
    pause(Rest, Out);
pause([Pid | Rest], Out) ->
    case erlang:process_info(Pid, registered_name) of
        {registered_name, _} ->
            %% A registered process (net_kernel, rex, global, a user's named server) is
            %% never suspended here: a peer could hold a lane back to stall it, and
            %% one such process stalled can stall the node. Those are left to the link's
            %% own busy state, as on any connection.
            pause(Rest, Out);
        _ ->
            suspend(Pid, Rest, Out)
    end.

suspend(Pid, Rest, #out{paused = Paused} = Out) ->
    try erlang:suspend_process(Pid, [asynchronous]) of
        _ -> pause(Rest, Out#out{paused = Paused#{Pid => true}})
    catch
        error:badarg -> pause(Rest, Out)  % gone already, or not a local process
    end.

resume(Pids, #out{paused = Paused} = Out) ->
    Out#out{paused = lists:foldl(fun resume_one/2, Paused, Pids)}.

resume_one(Pid, Paused) when is_map_key(Pid, Paused) ->
    catch erlang:resume_process(Pid),
    maps:remove(Pid, Paused);
resume_one(_Pid, Paused) ->
    Paused.

%% Returns the packets in order and whether the VM may have more.
collect(_DHandle, 0, _Bytes, Acc) ->
    {lists:reverse(Acc), true};
collect(_DHandle, _N, Bytes, Acc) when Bytes =< 0 ->
    {lists:reverse(Acc), true};
collect(DHandle, N, Bytes, Acc) ->
    case erlang:dist_ctrl_get_data(DHandle) of
        none -> {lists:reverse(Acc), false};
        {Size, Data} -> collect(DHandle, N - 1, Bytes - Size, [Data | Acc])
    end.

closed(Node, Why) ->
    trust_dist_log:log(notice, "link to ~p closed: ~ts", [Node, Why]),
    exit({shutdown, {trust_dist_closed, Why}}).

%%% The input handler

%% @private
input_handler(Ctrl, DHandle, Link) ->
    receive
        {trust_dist_in, Packets} ->
            Bytes = put_data(DHandle, Packets, 0),
            ok = trust_dist_nif:ack(Link, Bytes),
            input_handler(Ctrl, DHandle, Link);
        {trust_dist_closed, Why} ->
            exit({shutdown, {trust_dist_closed, Why}})
    end.

put_data(_DHandle, [], Bytes) ->
    Bytes;
put_data(DHandle, [Packet | Rest], Bytes) ->
    try erlang:dist_ctrl_put_data(DHandle, Packet) of
        _ -> put_data(DHandle, Rest, Bytes + byte_size(Packet))
    catch
        error:notsup ->
            %% The connection is going down.
            exit({shutdown, connection_closing})
    end.
