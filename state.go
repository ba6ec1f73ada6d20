package swo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/pgswo/swo/internal/cluster"
	"github.com/pgswo/swo/internal/meta"
	"github.com/pgswo/swo/internal/msglog"
	"github.com/pgswo/swo/internal/replicate"
)

// State is the state of a switchover cluster. Every node derives it from the
// message log in the old database, so every node agrees on it.
type State int

// The states, in the order of a successful run.
const (
	StateUnknown   State = iota // nothing known yet: no RESET since the nodes started, or the log is unreadable
	StateResetting              // RESET in progress: cancelling, cleaning up, checking every node and precondition
	StateIdle                   // checked and ready: EXECUTE may start
	StateSyncing                // initial copy and incremental sync running; the service runs normally
	StatePausing                // application connections to the old database are being drained
	StateExecuting              // stop-the-world: final sync and commit of the switch
	StateDone                   // switched: the new database is live, the old one obsolete
	StateFailed                 // the last RESET or EXECUTE failed; the service runs on the old database
)

var stateNames = [...]string{
	StateUnknown:   "unknown",
	StateResetting: "resetting",
	StateIdle:      "idle",
	StateSyncing:   "syncing",
	StatePausing:   "pausing",
	StateExecuting: "executing",
	StateDone:      "done",
	StateFailed:    "failed",
}

// States lists every state.
func States() []State {
	s := make([]State, len(stateNames))
	for i := range s {
		s[i] = State(i)
	}
	return s
}

// String returns the lower-case name of the state.
func (s State) String() string {
	if s < 0 || int(s) >= len(stateNames) {
		return fmt.Sprintf("State(%d)", int(s))
	}
	return stateNames[s]
}

// MarshalText renders the state by name, so Status serialises as "idle", not 2.
func (s State) MarshalText() ([]byte, error) {
	if s < 0 || int(s) >= len(stateNames) {
		return nil, fmt.Errorf("invalid state %d", int(s))
	}
	return []byte(s.String()), nil
}

// UnmarshalText parses a state name.
func (s *State) UnmarshalText(b []byte) error {
	for i, n := range stateNames {
		if n == string(b) {
			*s = State(i)
			return nil
		}
	}
	return fmt.Errorf("unknown state %q", b)
}

// transitions lists, for each state, the states it may move to. RESET may
// start from anywhere but done (a completed switch is not undone: the old
// database is obsolete); any running state may fail (errors, timeouts, a lost
// leader); a run moves strictly forward.
var transitions = map[State][]State{
	StateUnknown:   {StateResetting, StateDone, StateFailed},
	StateResetting: {StateResetting, StateIdle, StateFailed},
	StateIdle:      {StateResetting, StateSyncing, StateFailed},
	StateSyncing:   {StateResetting, StatePausing, StateFailed},
	StatePausing:   {StateResetting, StateExecuting, StateFailed},
	StateExecuting: {StateResetting, StateDone, StateFailed},
	StateDone:      {},
	StateFailed:    {StateResetting, StateFailed},
}

// CanTransition reports whether the state machine allows moving from s to next.
func (s State) CanTransition(next State) bool {
	for _, t := range transitions[s] {
		if t == next {
			return true
		}
	}
	return false
}

// Running reports whether an execution is under way in s.
func (s State) Running() bool {
	return s == StateSyncing || s == StatePausing || s == StateExecuting
}

// ---- The cluster's state, derived from the message log ----

// view is what a node knows of its cluster: the state folded from the log
// since the last RESET, and the node list from the last heartbeat.
type view struct {
	State  State
	Run    int64     // the current run: id of its reset message (0: none yet)
	Owner  uuid.UUID // the node doing the run's work: the resetter, then the leader
	Leader uuid.UUID
	LastID int64
	Err    failure              // why the run failed
	At     map[string]time.Time // when each kind of message of the run was appended (database clock)
	Since  time.Time            // when this node saw the current state begin (local clock)
	Pause  pauseData            // from the pause message
	Done   doneData             // from the done message
	Nodes  []cluster.Node
}

// Message payloads.
type (
	resetData   struct{}
	executeData struct {
		Leader uuid.UUID `json:"leader"`
	}
	pauseData struct {
		BudgetMS int64 `json:"budget_ms"`
		FinalMS  int64 `json:"final_ms"`
	}
	doneData struct {
		To      uuid.UUID `json:"to"`       // identity of the database switched to
		PauseMS int64     `json:"pause_ms"` // the stop-the-world window as the leader measured it
		FinalMS int64     `json:"final_ms"` // of which the final sync and commit
		Changes int       `json:"changes"`  // changes applied by the final sync
	}
)

// transitionOf maps the kinds of messages that move the state to the state
// they move it to.
var transitionOf = map[string]State{
	msglog.KindIdle: StateIdle, msglog.KindExecute: StateSyncing, msglog.KindPause: StatePausing,
	msglog.KindExecuting: StateExecuting, msglog.KindDone: StateDone, msglog.KindFailed: StateFailed,
}

// apply folds one message into the view, following the transitions table:
// a message that the state machine does not allow from the current state is
// ignored (it belongs to a run that was overtaken), so every node that reads
// the same log derives the same state. now is when the node read it. It
// reports whether the state changed.
func (v *view) apply(m msglog.Message, now time.Time) bool {
	v.LastID = max(v.LastID, m.ID)
	if m.Kind == msglog.KindReset {
		*v = view{State: StateResetting, Run: m.Run, Owner: m.Node, LastID: m.ID, Nodes: v.Nodes,
			At: map[string]time.Time{m.Kind: m.At}, Since: now}
		return true
	}
	if m.Run != v.Run {
		return false
	}
	to, ok := transitionOf[m.Kind]
	if !ok || !v.State.CanTransition(to) {
		return false
	}
	switch m.Kind {
	case msglog.KindExecute:
		var d executeData
		_ = m.Decode(&d)
		v.Leader, v.Owner = d.Leader, d.Leader
	case msglog.KindPause:
		_ = m.Decode(&v.Pause)
	case msglog.KindDone:
		_ = m.Decode(&v.Done)
	case msglog.KindFailed:
		v.Err = failure{} // a failure replaces an earlier one whole
		_ = m.Decode(&v.Err)
	}
	v.State = to
	if v.At == nil {
		v.At = map[string]time.Time{}
	}
	v.At[m.Kind] = m.At
	v.Since = now
	return true
}

// derive folds a log into a view: the state every node reading the same
// messages agrees on, whatever order of runs, resets and failures they hold.
func derive(msgs []msglog.Message, now time.Time) view {
	var v view
	for _, m := range msgs {
		v.apply(m, now)
	}
	return v
}

// ---- The node ----

// timings are a node's heartbeat and liveness settings.
type timings struct {
	heartbeat time.Duration // heartbeat and node-list refresh
	timeout   time.Duration // a node not seen for this long is not alive
	poll      time.Duration // log read when no notification came
	recheck   time.Duration // re-examination of an invalid configuration
}

var defaultTimings = timings{heartbeat: time.Second, timeout: 5 * time.Second, poll: 500 * time.Millisecond, recheck: 5 * time.Second}

// routes is how the node moves the connector's new connections: the router.
type routes interface {
	pause(until time.Time)
	resume()
	switched(to uuid.UUID)
	prewarm()
	report() (routing Routing, paused bool)
}

// runs is how the node starts and stops the runs it leads: the leader.
type runs interface {
	start(run int64)
	stop(wait bool)
	leads(run int64) bool
	progress() *Progress
}

// node is this instance as a member of the switchover cluster: it beats its
// heartbeat in the old database's node table, follows the message log,
// derives the cluster's state from it, and reacts to each change (pause,
// resume and switch the router; start and stop leading a run).
//
// Goroutines: follow, one per node, on its own control connection to the
// old database, from NewConnector to Close or the switch. The leader's run
// and Reset also apply messages they appended (observe).
//
// Lock order: reactMu, then viewMu; mu and the endpoint's info lock are
// leaves. reactMu is held while reacting, so that reactions happen in the
// order of the state changes; the router's and the leader's locks may be
// taken under it, never the other way round.
type node struct {
	*common
	id     uuid.UUID
	msgs   msglog.Log
	table  cluster.Table
	timing timings
	routes routes
	runs   runs

	wake      chan struct{}
	resetting atomic.Int64 // the run this node's Reset is working on, if any

	mu          sync.Mutex
	configErr   error // why this node's configuration is invalid; nil if valid
	foreignErr  error // nodes of the same databases in another namespace (foreignNodes)
	lastErr     error
	lastRecheck time.Time
	lastForeign time.Time

	reactMu     sync.Mutex
	viewMu      sync.Mutex
	view        view
	viewChanged chan struct{} // closed and replaced at every state change
}

func newNode(s *common, timing timings, rt routes, lead runs) *node {
	return &node{
		common: s, id: uuid.New(), timing: timing, routes: rt, runs: lead,
		msgs:        msglog.Log{Table: s.meta.Table("log"), Channel: s.cfg.Namespace, Lock: s.keys.pair(lockSetup)},
		table:       cluster.Table{Name: s.meta.Table("nodes")},
		wake:        make(chan struct{}, 1),
		viewChanged: make(chan struct{}),
		view:        view{At: map[string]time.Time{}},
	}
}

// follow is the node's loop on its control connection to the old database:
// it reads the log (woken by NOTIFY, or polling), derives the cluster state,
// reacts to it, beats its heartbeat, and fails a run whose owner stopped
// answering. After the switch it confirms once and stops: nothing checks the
// old database any more.
func (n *node) follow(ctx context.Context, conn *pgx.Conn) {
	defer func() {
		if conn != nil {
			closeBounded(conn)
		}
	}()
	backoff := 100 * time.Millisecond
	listening := false
	var lastBeat time.Time
	for ctx.Err() == nil {
		if conn == nil {
			var err error
			if conn, err = n.connect(ctx, n.old, roleCtl); err != nil {
				n.noteErr(err)
				select {
				case <-ctx.Done():
				case <-time.After(backoff):
				}
				// At most a heartbeat apart: a node back after its database
				// came back must beat before the others judge it gone.
				backoff = min(2*backoff, n.timing.heartbeat)
				continue
			}
			listening = false
		}
		err := n.followOnce(ctx, conn, &listening, &lastBeat)
		switch {
		case errors.Is(err, errStopFollowing):
			return
		case err != nil && ctx.Err() == nil:
			n.noteErr(fmt.Errorf("following the cluster: %w", err))
			closeBounded(conn)
			conn = nil
			select { // a persistent error must not become a reconnection storm
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, n.timing.heartbeat)
		default:
			backoff = 100 * time.Millisecond
		}
	}
}

var errStopFollowing = errors.New("stop following")

func (n *node) followOnce(ctx context.Context, conn *pgx.Conn, listening *bool, lastBeat *time.Time) error {
	if !*listening {
		if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{n.cfg.Namespace}.Sanitize()); err != nil {
			return err
		}
		*listening = true
	}
	msgs, err := n.msgs.Read(ctx, conn, n.lastID())
	if err != nil {
		return err
	}
	for _, m := range msgs {
		n.observe(m)
	}
	if routing, _ := n.routes.report(); routing != RoutingOld {
		// Switched: say so once, see the run finished, and leave the old
		// database alone.
		_ = n.beat(ctx, conn, false)
		_, _ = n.msgs.Append(ctx, conn, n.id, msglog.KindConfirm, n.currentRun(), nil, nil)
		if routing == RoutingNext {
			n.watchSwitch(ctx, conn)
			n.finishAfterLeader(ctx, conn)
		}
		return errStopFollowing
	}
	if info, _, err := n.meta.Read(ctx, conn); err != nil {
		return err
	} else if info.Obsolete() {
		n.routes.switched(info.SwitchedTo) // the mark is the truth, log or not
		return nil
	}
	if time.Since(*lastBeat) >= n.timing.heartbeat {
		n.mu.Lock()
		recheck := n.configErr != nil && time.Since(n.lastRecheck) >= n.timing.recheck
		if recheck {
			n.lastRecheck = time.Now()
		}
		n.mu.Unlock()
		if recheck {
			n.recheckNext(ctx, conn)
		}
		if err := n.beat(ctx, conn, false); err != nil {
			return err
		}
		*lastBeat = time.Now()
		if err := n.checkOwner(ctx, conn); err != nil {
			return err
		}
	}
	wctx, cancel := context.WithTimeout(ctx, n.timing.poll)
	defer cancel()
	go func() {
		select {
		case <-n.wake:
			cancel()
		case <-wctx.Done():
		}
	}()
	_, err = conn.WaitForNotification(wctx)
	if err != nil && wctx.Err() != nil && ctx.Err() == nil {
		return nil // poll interval elapsed, or woken
	}
	return err
}

// finishAfterLeader makes sure the new database's foreign keys get
// validated after the switch: the leader does it, but it may die (or fail)
// right after the commit, and nothing else would. Every other node waits
// while the leader is alive and validations are pending, then does what is
// left. VALIDATE CONSTRAINT does not block the application, and validating a
// valid constraint again is harmless.
func (n *node) finishAfterLeader(ctx context.Context, oldConn *pgx.Conn) {
	v, _ := n.currentView()
	if n.runs.leads(v.Run) {
		return // this node's run does it
	}
	ctx, cancel := context.WithTimeout(ctx, afterSwitchTimeout)
	defer cancel()
	dst, err := n.config(ctx, n.next, roleSync)
	if err != nil {
		return
	}
	conn, err := replicate.Connect(ctx, dst)
	if err != nil {
		if ctx.Err() == nil { // not a node closing
			n.noteErr(fmt.Errorf("switched, but the new database's foreign keys could not be checked: %w", err))
		}
		return
	}
	defer closeBounded(conn)
	for ctx.Err() == nil {
		pending, err := replicate.PendingFinish(ctx, conn, n.cfg.Namespace, n.old.Info().ID)
		if err != nil || pending == 0 {
			return
		}
		leaderAlive := false
		if nodes, err := n.table.List(ctx, oldConn, n.timing.timeout); err == nil {
			leaderAlive = slices.ContainsFunc(nodes, func(c cluster.Node) bool { return c.ID == v.Leader && c.Alive })
		}
		if !leaderAlive {
			n.log.Info("the leader is gone: validating the new database's foreign keys", "pending", pending)
			e := &replicate.Engine{Dst: dst, Schema: n.cfg.Namespace, SourceID: n.old.Info().ID, Log: n.log}
			if err := e.Finish(ctx); err != nil {
				n.noteErr(fmt.Errorf("switched, but validating foreign keys in the new database failed: %w", err))
			}
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(n.timing.heartbeat):
		}
	}
}

// finishLeftovers validates the foreign keys a switch left NOT VALID in the
// new database, when a node starts after the switch.
func (n *node) finishLeftovers(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, afterSwitchTimeout)
	defer cancel()
	dst, err := n.config(ctx, n.next, roleSync)
	if err != nil {
		return
	}
	conn, err := replicate.Connect(ctx, dst)
	if err != nil {
		return
	}
	pending, err := replicate.PendingFinish(ctx, conn, n.cfg.Namespace, n.old.Info().ID)
	closeBounded(conn)
	if err != nil || pending == 0 {
		return
	}
	e := &replicate.Engine{Dst: dst, Schema: n.cfg.Namespace, SourceID: n.old.Info().ID, Log: n.log}
	if err := e.Finish(ctx); err != nil {
		n.noteErr(fmt.Errorf("validating foreign keys the switch left in the new database failed: %w", err))
	}
}

// poke wakes the follow loop at once (after this node appended a message).
func (n *node) poke() {
	select {
	case n.wake <- struct{}{}:
	default:
	}
}

// observe applies a message to the view and reacts to a state change.
// Observations are serialised (the follow loop, Reset and the leader all
// observe), so that reactions happen in the order of the state changes.
func (n *node) observe(m msglog.Message) {
	n.reactMu.Lock()
	defer n.reactMu.Unlock()
	n.viewMu.Lock()
	prev := n.view.State
	changed := n.view.apply(m, time.Now())
	v := n.view
	v.At = maps.Clone(v.At)
	if changed {
		close(n.viewChanged)
		n.viewChanged = make(chan struct{})
	}
	n.viewMu.Unlock()
	if m.Kind == msglog.KindPrepare && m.Run == v.Run && v.State == StateSyncing {
		n.routes.prewarm()
	}
	if !changed {
		return
	}
	n.log.Info("cluster state", "from", prev.String(), "to", v.State.String(), "run", v.Run, "message", m.Kind)
	switch v.State {
	case StateResetting:
		n.runs.stop(false)
		n.routes.resume()
	case StateSyncing:
		if v.Leader == n.id {
			n.runs.start(v.Run)
		}
	case StatePausing:
		budget := time.Duration(v.Pause.BudgetMS+v.Pause.FinalMS)*time.Millisecond + 2*time.Second
		n.routes.pause(time.Now().Add(budget))
	case StateDone:
		// The database switched to, as the leader knew it: a node configured
		// with another --db-url-next refuses rather than follow it.
		to := v.Done.To
		if to == uuid.Nil {
			to = n.next.Info().ID
		}
		n.routes.switched(to)
	case StateFailed:
		n.runs.stop(false) // a leader declared failed stops, whatever it was doing
		n.routes.resume()
	case StateIdle:
		n.routes.resume()
	}
}

// nodeReport is what a node says about itself in its heartbeat.
type nodeReport struct {
	Routing   Routing   `json:"routing"`
	Paused    bool      `json:"paused"`
	LastError string    `json:"last_error,omitempty"`
	Progress  *Progress `json:"progress,omitempty"`
}

// beat upserts this node's row with its self-report and refreshes the node
// list. Every few beats, and when force is set (RESET, EXECUTE), it also
// looks for nodes of the same databases in another namespace.
func (n *node) beat(ctx context.Context, conn *pgx.Conn, force bool) error {
	if time.Since(n.lastForeign) >= n.timing.recheck || force {
		err := n.foreignNodes(ctx, conn)
		if err != nil && !errors.Is(err, errForeignNodes) {
			return err
		}
		n.mu.Lock()
		n.foreignErr, n.lastForeign = err, time.Now()
		n.mu.Unlock()
	}
	n.mu.Lock()
	row := cluster.Node{ID: n.id, Name: n.cfg.NodeName, Version: n.cfg.Version, CanExec: !n.cfg.APIOnly,
		OldID: n.old.Info().ID, NextID: n.next.Info().ID, Agreed: n.cfg.agreed()}
	if n.configErr != nil {
		row.ConfigError = n.configErr.Error()
	} else if n.foreignErr != nil {
		row.ConfigError = n.foreignErr.Error()
	}
	self := nodeReport{LastError: errString(n.lastErr)}
	n.mu.Unlock()
	self.Routing, self.Paused = n.routes.report()
	self.Progress = n.runs.progress()
	if err := n.table.Beat(ctx, conn, row, self); err != nil {
		return err
	}
	list, err := n.table.List(ctx, conn, n.timing.timeout)
	if err != nil {
		return err
	}
	n.setNodes(list)
	return nil
}

// setNodes replaces the node list that Status shows.
func (n *node) setNodes(list []cluster.Node) {
	n.viewMu.Lock()
	n.view.Nodes = list
	n.viewMu.Unlock()
}

// watchSwitch keeps the node list fresh after this node switched, until
// every alive node says it routes to the new database (or twice the
// liveness timeout has passed): the follow loop stops at the switch, and
// without this the list would show the other nodes as they were at that
// moment, some still on the old database.
func (n *node) watchSwitch(ctx context.Context, conn *pgx.Conn) {
	deadline := time.Now().Add(2 * n.timing.timeout)
	for ctx.Err() == nil {
		list, err := n.table.List(ctx, conn, n.timing.timeout)
		if err != nil {
			return
		}
		n.setNodes(list)
		if allSwitched(list) || time.Now().After(deadline) {
			return
		}
		select {
		case <-ctx.Done():
		case <-time.After(n.timing.heartbeat):
		}
	}
}

// allSwitched reports whether every alive node of list says it routes to the
// new database.
func allSwitched(list []cluster.Node) bool {
	for _, c := range list {
		var r nodeReport
		if c.Alive && (json.Unmarshal(c.Status, &r) != nil || r.Routing != RoutingNext) {
			return false
		}
	}
	return true
}

var errForeignNodes = errors.New("nodes of the same databases run in another namespace")

// foreignNodes looks for alive nodes of another namespace whose next
// database is this node's: instances of one service started with different
// Config.Namespace values. They take another lock, so a switch in this
// namespace would neither drain them nor move them, and they would go on
// writing to the old database. Identities are per namespace, so a candidate
// found in the old database is confirmed in the next one: its namespace's
// identity there must be the one the candidate reports. (Two services
// sharing the old database keep their own namespaces; they cannot move to
// the same next database as separate clusters.)
func (n *node) foreignNodes(ctx context.Context, conn *pgx.Conn) error {
	// pg_class, not to_regclass, which fails on a schema the role may not
	// use (pg_toast, other sessions' temporary schemas).
	rows, err := conn.Query(ctx, `SELECT n.nspname FROM pg_namespace n
WHERE n.nspname <> $1 AND has_schema_privilege(n.oid, 'USAGE')
	AND (SELECT count(*) FROM pg_class c WHERE c.relnamespace = n.oid AND c.relname IN ('nodes', 'meta', 'log') AND c.relkind = 'r') = 3
ORDER BY 1`, n.cfg.Namespace)
	if err != nil {
		return err
	}
	spaces, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || len(spaces) == 0 {
		return err
	}
	type candidate struct {
		ns    string
		next  uuid.UUID
		names []string
	}
	var cands []candidate
	for _, ns := range spaces {
		rows, err := conn.Query(ctx, fmt.Sprintf(`SELECT next_id, array_agg(name ORDER BY name) FROM %s.nodes
WHERE next_id IS NOT NULL AND now() - seen_at < $1::interval GROUP BY next_id`, pgx.Identifier{ns}.Sanitize()),
			fmt.Sprintf("%d milliseconds", n.timing.timeout.Milliseconds()))
		if err != nil {
			continue // not a table of ours after all
		}
		found, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (candidate, error) {
			c := candidate{ns: ns}
			return c, r.Scan(&c.next, &c.names)
		})
		if err == nil {
			cands = append(cands, found...)
		}
	}
	if len(cands) == 0 {
		return nil
	}
	next, err := n.connect(ctx, n.next, roleCtl)
	if err != nil {
		return nil // judged when the next database can be reached
	}
	defer closeBounded(next)
	var same []string
	for _, c := range cands {
		var id uuid.UUID
		if next.QueryRow(ctx, fmt.Sprintf("SELECT id FROM %s.meta", pgx.Identifier{c.ns}.Sanitize())).Scan(&id) == nil && id == c.next {
			same = append(same, fmt.Sprintf("namespace %q: %s", c.ns, strings.Join(c.names, ", ")))
		}
	}
	if len(same) == 0 {
		return nil
	}
	return fmt.Errorf("%w (%s), which the switch in namespace %q would neither drain nor move: give every instance the same Config.Namespace",
		errForeignNodes, strings.Join(same, "; "), n.cfg.Namespace)
}

// checkOwner fails the run if the node doing its work stopped answering:
// every running state thereby has a timeout of a few heartbeats.
func (n *node) checkOwner(ctx context.Context, conn *pgx.Conn) error {
	v, _ := n.currentView()
	reason := ownerLost(v, n.id, n.owns(v), time.Since(v.Since), n.timing.timeout)
	if reason == "" {
		return nil
	}
	_, err := n.msgs.Append(ctx, conn, n.id, msglog.KindFailed, v.Run, failure{Error: reason}, sameRun(v.Run, v.LastID))
	if errors.Is(err, msglog.ErrRefused) {
		return nil
	}
	if err != nil {
		return err
	}
	n.log.Warn("run failed: " + reason)
	// The run can no longer commit ("done" would not follow "failed"), so
	// ending its sessions is safe, and it frees the stop-the-world lock if a
	// stalled leader still holds it.
	for _, lock := range []int32{lockConn, lockExec} {
		if k, err := n.keys.terminateExclusiveHolders(ctx, conn, lock); err == nil && k > 0 {
			n.log.Warn("ended the sessions of the failed run", "sessions", k)
		}
	}
	return nil
}

// ownerLost decides whether the run in v has lost its owner, and says why
// ("" if not): a pure function of the view, so every node decides alike.
// self is the deciding node; owned whether it is doing the run's work; in
// how long the state has lasted as this node saw it.
func ownerLost(v view, self uuid.UUID, owned bool, in, timeout time.Duration) string {
	if v.State != StateResetting && !v.State.Running() {
		return ""
	}
	if in < timeout {
		return "" // give a state just begun one timeout before judging its owner
	}
	if v.Owner == self {
		// This node owns the run: it must be working on it. If it is not (its
		// work ended without a word, say because the old database was
		// unreachable when it tried to report), the run is over.
		if owned {
			return ""
		}
		return fmt.Sprintf("node %s (%s) stopped working on the run during %s without a result", self, nodeName(v.Nodes, self), v.State)
	}
	for _, n := range v.Nodes {
		if n.ID == v.Owner && n.Alive {
			return ""
		}
	}
	return fmt.Sprintf("node %s (%s) stopped answering during %s", v.Owner, nodeName(v.Nodes, v.Owner), v.State)
}

// owns reports whether this node is doing the work of the run in v.
func (n *node) owns(v view) bool {
	if v.State == StateResetting {
		return n.resetting.Load() == v.Run
	}
	return n.runs.leads(v.Run)
}

// sameRun refuses an append if anything was appended since the view was
// taken (the state moved on, or a new run started).
func sameRun(run, lastID int64) func(*msglog.Message) error {
	return func(last *msglog.Message) error {
		if last == nil || last.Run != run || last.ID != lastID {
			return errors.New("the cluster state changed meanwhile")
		}
		return nil
	}
}

func nodeName(nodes []cluster.Node, id uuid.UUID) string {
	for _, n := range nodes {
		if n.ID == id {
			return n.Name
		}
	}
	return "unknown node"
}

func (n *node) lastID() int64 {
	n.viewMu.Lock()
	defer n.viewMu.Unlock()
	return n.view.LastID
}

func (n *node) currentRun() int64 {
	n.viewMu.Lock()
	defer n.viewMu.Unlock()
	return n.view.Run
}

// currentView returns the view and a channel closed at its next change.
func (n *node) currentView() (view, <-chan struct{}) {
	n.viewMu.Lock()
	defer n.viewMu.Unlock()
	v := n.view
	v.At = maps.Clone(v.At) // apply writes to the map; the copy must not share it
	return v, n.viewChanged
}

// waitView waits (bounded by ctx) until cond holds for the view.
func (n *node) waitView(ctx context.Context, cond func(view) bool) {
	for {
		v, changed := n.currentView()
		if cond(v) {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

// problems returns an error naming every alive node whose configuration is
// not valid.
func (n *node) problems() error {
	v, _ := n.currentView()
	return nodeProblems(v.Nodes)
}

// nodeProblems lists the alive nodes whose configuration is not valid.
func nodeProblems(nodes []cluster.Node) error {
	probs := cluster.Problems(nodes)
	var lines []string
	for _, n := range nodes {
		if p := probs[n.ID]; p != "" {
			lines = append(lines, fmt.Sprintf("node %s: %s", n.Name, p))
		}
	}
	if len(lines) > 0 {
		return fmt.Errorf("%d node(s) with an invalid configuration:\n  %s", len(lines), strings.Join(lines, "\n  "))
	}
	return nil
}

// ---- This node's configuration ----

// join creates the library's schema in both databases if needed, reads
// their identities, and decides whether this node's configuration is valid.
// It returns the control connection for follow, or nil when the switch is
// already done and the node has nothing to follow.
func (n *node) join(ctx context.Context) (*pgx.Conn, error) {
	oldConn, err := n.connect(ctx, n.old, roleCtl)
	if err != nil {
		return nil, err
	}
	oldInfo, err := n.meta.Ensure(ctx, oldConn, n.msgs.DDL(), n.table.DDL())
	if err != nil {
		closeBounded(oldConn)
		return nil, fmt.Errorf("old database %s: %w", n.old.describe(), err)
	}
	n.old.setInfo(oldInfo)
	var nextInfo meta.Info
	nextConn, nerr := n.connect(ctx, n.next, roleCtl)
	if nerr == nil {
		defer closeBounded(nextConn)
		nextInfo, nerr = n.meta.Ensure(ctx, nextConn)
		if nerr != nil {
			nerr = fmt.Errorf("next database %s: %w", n.next.describe(), nerr)
		}
		n.next.setInfo(nextInfo)
	}
	switch {
	case oldInfo.Obsolete() && nerr != nil:
		closeBounded(oldConn)
		return nil, fmt.Errorf("the old database was switched over to database %s, which cannot be reached: %w", oldInfo.SwitchedTo, nerr)
	case oldInfo.Obsolete() && (oldInfo.SwitchedTo != nextInfo.ID || nextInfo.Obsolete()):
		closeBounded(oldConn)
		return nil, n.obsolete(n.old, oldInfo)
	case oldInfo.Obsolete():
		// The switch is done and NextURL is the new database: use it.
		closeBounded(oldConn)
		n.routes.switched(nextInfo.ID)
		n.log.Info("old database was already switched over; using the next database", "next", n.next.describe())
		return nil, nil
	case nerr != nil:
		n.setConfigErr(nerr)
	case nextInfo.Obsolete():
		closeBounded(oldConn)
		return nil, n.obsolete(n.next, nextInfo)
	case oldInfo.ID == nextInfo.ID:
		if err := n.separateTwins(ctx, oldConn, nextConn); err != nil {
			n.setConfigErr(err)
		}
	}
	return oldConn, nil
}

// recheckNext re-examines the next database while this node's configuration
// is invalid (say it was unreachable when the node started), so that the
// node becomes valid once the cause is gone, without a restart.
func (n *node) recheckNext(ctx context.Context, oldConn *pgx.Conn) {
	err := func() error {
		nextConn, err := n.connect(ctx, n.next, roleCtl)
		if err != nil {
			return err
		}
		defer closeBounded(nextConn)
		info, err := n.meta.Ensure(ctx, nextConn)
		if err != nil {
			return fmt.Errorf("next database %s: %w", n.next.describe(), err)
		}
		if info.Obsolete() {
			return n.obsolete(n.next, info)
		}
		n.next.setInfo(info)
		if info.ID == n.old.Info().ID {
			return n.separateTwins(ctx, oldConn, nextConn)
		}
		return nil
	}()
	n.mu.Lock()
	n.configErr = n.scrub(err)
	n.mu.Unlock()
	if err == nil {
		n.log.Info("this node's configuration is valid now", "next_db_id", n.next.Info().ID)
	}
}

// separateTwins handles two databases with the same identity: either both
// URLs reach one database (a configuration error), or the next database was
// restored from a copy of the old one and gets an identity of its own.
func (n *node) separateTwins(ctx context.Context, oldConn, nextConn *pgx.Conn) error {
	same, err := sameDatabase(ctx, oldConn, nextConn)
	if err != nil {
		return err
	}
	if same {
		return fmt.Errorf("%w: --db-url and --db-url-next (Config.OldURL and Config.NextURL) reach the same database (%s): point NextURL at the new database",
			ErrConfig, n.old.Info().ID)
	}
	id, err := n.meta.NewIdentity(ctx, nextConn, n.old.Info().ID)
	if err != nil {
		return err
	}
	n.log.Warn("next database carried a copy of the old database's identity; gave it a new one", "next_db_id", id)
	info := n.next.Info()
	info.ID = id
	n.next.setInfo(info)
	return nil
}

// sameDatabase tells, by a live session check, whether the two connections
// reach one database (whatever their identities say).
func sameDatabase(ctx context.Context, a, b *pgx.Conn) (bool, error) {
	sess, err := meta.CurrentSession(ctx, a)
	if err != nil {
		return false, err
	}
	return meta.SeesSession(ctx, b, sess)
}

func (n *node) setConfigErr(err error) {
	err = n.scrub(err)
	n.mu.Lock()
	n.configErr = err
	n.mu.Unlock()
	n.log.Error("this node's configuration is not valid; EXECUTE is refused until it is fixed", "error", err)
}

// noteErr records the last error this node met (shown by Status) and logs it.
func (n *node) noteErr(err error) {
	err = n.scrub(err)
	n.mu.Lock()
	n.lastErr = err
	n.mu.Unlock()
	n.log.Warn(err.Error())
}

// errs returns this node's configuration error and last error.
func (n *node) errs() (config, last error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.configErr == nil {
		return n.foreignErr, n.lastErr
	}
	return n.configErr, n.lastErr
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
