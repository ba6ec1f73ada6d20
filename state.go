package swo

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"

	"github.com/pgswo/swo/internal/cluster"
	"github.com/pgswo/swo/internal/msglog"
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
		return nil, fmt.Errorf("swo: invalid state %d", int(s))
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
	return fmt.Errorf("swo: unknown state %q", b)
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
	Err    string               // why the run failed
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
	failedData struct {
		Error string `json:"error"`
	}
)

// apply folds one message into the view, following the transitions table:
// a message that the state machine does not allow from the current state is
// ignored (it belongs to a run that was overtaken), so every node that reads
// the same log derives the same state. It reports whether the state changed.
func (v *view) apply(m msglog.Message) bool {
	v.LastID = max(v.LastID, m.ID)
	if m.Kind == msglog.KindReset {
		*v = view{State: StateResetting, Run: m.Run, Owner: m.Node, LastID: m.ID, Nodes: v.Nodes,
			At: map[string]time.Time{m.Kind: m.At}, Since: time.Now()}
		return true
	}
	if m.Run != v.Run {
		return false
	}
	next := map[string]State{
		msglog.KindIdle: StateIdle, msglog.KindExecute: StateSyncing, msglog.KindPause: StatePausing,
		msglog.KindExecuting: StateExecuting, msglog.KindDone: StateDone, msglog.KindFailed: StateFailed,
	}
	to, ok := next[m.Kind]
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
		var d failedData
		_ = m.Decode(&d)
		v.Err = d.Error
	}
	v.State = to
	v.At[m.Kind] = m.At
	v.Since = time.Now()
	return true
}

// Heartbeat and liveness timings (variables so that tests can shorten them).
var (
	heartbeatEvery = time.Second     // node heartbeat and node-list refresh
	nodeTimeout    = 5 * time.Second // a node not seen for this long is not alive
	pollEvery      = 500 * time.Millisecond
)

// follow is the node's loop on its control connection to the old database:
// it reads the log (woken by NOTIFY, or polling), derives the cluster state,
// reacts to it (pause, switch, resume, lead), beats its heartbeat, and fails
// a run whose owner stopped answering. After the switch it confirms once and
// stops: nothing checks the old database any more.
func (c *Connector) follow(ctx context.Context, conn *pgx.Conn) {
	defer c.bg.Done()
	defer func() {
		if conn != nil {
			conn.Close(context.Background())
		}
	}()
	backoff := 100 * time.Millisecond
	listening := false
	var lastBeat time.Time
	for ctx.Err() == nil {
		if conn == nil {
			var err error
			if conn, err = c.connect(ctx, c.old, roleCtl); err != nil {
				c.noteErr(err)
				select {
				case <-ctx.Done():
				case <-time.After(backoff):
				}
				backoff = min(2*backoff, 5*time.Second)
				continue
			}
			listening = false
		}
		err := c.followOnce(ctx, conn, &listening, &lastBeat)
		switch {
		case errors.Is(err, errStopFollowing):
			return
		case err != nil && ctx.Err() == nil:
			c.noteErr(fmt.Errorf("swo: following the cluster: %w", err))
			conn.Close(context.Background())
			conn = nil
		default:
			backoff = 100 * time.Millisecond
		}
	}
}

var errStopFollowing = errors.New("stop following")

func (c *Connector) followOnce(ctx context.Context, conn *pgx.Conn, listening *bool, lastBeat *time.Time) error {
	if !*listening {
		if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{c.cfg.Namespace}.Sanitize()); err != nil {
			return err
		}
		*listening = true
	}
	msgs, err := c.msgs.Read(ctx, conn, c.lastID())
	if err != nil {
		return err
	}
	for _, m := range msgs {
		c.observe(m)
	}
	if c.route.Load().target != toOld {
		// Switched: say so once, and leave the old database alone.
		_ = c.beat(ctx, conn)
		_, _ = c.msgs.Append(ctx, conn, c.id, msglog.KindConfirm, c.currentRun(), nil, nil)
		return errStopFollowing
	}
	if info, _, err := c.meta.Read(ctx, conn); err != nil {
		return err
	} else if info.Obsolete() {
		c.switched(info.SwitchedTo) // the mark is the truth, log or not
		return nil
	}
	if time.Since(*lastBeat) >= heartbeatEvery {
		c.stateMu.Lock()
		invalid := c.configErr != nil
		c.stateMu.Unlock()
		if invalid && time.Since(c.lastRecheck) >= 5*time.Second {
			c.lastRecheck = time.Now()
			c.recheckNext(ctx, conn)
		}
		if err := c.beat(ctx, conn); err != nil {
			return err
		}
		*lastBeat = time.Now()
		if err := c.checkOwner(ctx, conn); err != nil {
			return err
		}
	}
	wctx, cancel := context.WithTimeout(ctx, pollEvery)
	defer cancel()
	go func() {
		select {
		case <-c.wake:
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

// poke wakes the follow loop at once (after this node appended a message).
func (c *Connector) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// observe applies a message to the view and reacts to a state change.
// Observations are serialised (the follow loop and the leader both observe),
// so that reactions happen in the order of the state changes.
func (c *Connector) observe(m msglog.Message) {
	c.reactMu.Lock()
	defer c.reactMu.Unlock()
	c.viewMu.Lock()
	prev := c.view.State
	changed := c.view.apply(m)
	v := c.view
	v.At = maps.Clone(v.At)
	if changed {
		close(c.viewChanged)
		c.viewChanged = make(chan struct{})
	}
	c.viewMu.Unlock()
	if m.Kind == msglog.KindPrepare && m.Run == v.Run && v.State == StateSyncing {
		c.prewarm()
	}
	if !changed {
		return
	}
	c.log.Info("swo: cluster state", "from", prev.String(), "to", v.State.String(), "run", v.Run, "message", m.Kind)
	switch v.State {
	case StateResetting:
		c.stopLeading(false)
		c.resume()
	case StateSyncing:
		if v.Leader == c.id {
			c.startLeading(v.Run)
		}
	case StatePausing:
		budget := time.Duration(v.Pause.BudgetMS+v.Pause.FinalMS)*time.Millisecond + 2*time.Second
		c.pause(time.Now().Add(budget))
	case StateDone:
		// The database switched to, as the leader knew it: a node configured
		// with another --db-url-next refuses rather than follow it.
		to := v.Done.To
		if to == uuid.Nil {
			to = c.nextInfo().ID
		}
		c.switched(to)
	case StateFailed:
		c.stopLeading(false) // a leader declared failed stops, whatever it was doing
		c.resume()
	case StateIdle:
		c.resume()
	}
}

// beat upserts this node's row with its self-report and refreshes the node list.
func (c *Connector) beat(ctx context.Context, conn *pgx.Conn) error {
	c.stateMu.Lock()
	n := cluster.Node{ID: c.id, Name: c.cfg.NodeName, Version: c.cfg.Version, CanExec: !c.cfg.APIOnly,
		OldID: c.old.info.ID, NextID: c.nextInfo().ID}
	if c.configErr != nil {
		n.ConfigError = c.configErr.Error()
	}
	self := nodeReport{LastError: errString(c.lastErr)}
	c.stateMu.Unlock()
	r := c.route.Load()
	self.Routing, self.Paused = r.String(), r.paused != nil
	if p := c.leaderProgress(); p != nil {
		self.Progress = p
	}
	if err := c.nodes.Beat(ctx, conn, n, self); err != nil {
		return err
	}
	list, err := c.nodes.List(ctx, conn, nodeTimeout)
	if err != nil {
		return err
	}
	c.viewMu.Lock()
	c.view.Nodes = list
	c.viewMu.Unlock()
	return nil
}

// nodeReport is what a node says about itself in its heartbeat.
type nodeReport struct {
	Routing   string    `json:"routing"`
	Paused    bool      `json:"paused"`
	LastError string    `json:"last_error,omitempty"`
	Progress  *Progress `json:"progress,omitempty"`
}

// checkOwner fails the run if the node doing its work stopped answering:
// every running state thereby has a timeout of a few heartbeats.
func (c *Connector) checkOwner(ctx context.Context, conn *pgx.Conn) error {
	v, _ := c.currentView()
	if v.State != StateResetting && !v.State.Running() {
		return nil
	}
	if time.Since(v.Since) < nodeTimeout {
		return nil // give a state just begun one timeout before judging its owner
	}
	reason := fmt.Sprintf("node %s (%s) stopped answering during %s", v.Owner, nodeName(v.Nodes, v.Owner), v.State)
	if v.Owner == c.id {
		// This node owns the run: it must be working on it. If it is not (its
		// work ended without a word, say because the old database was
		// unreachable when it tried to report), the run is over.
		if c.owns(v) {
			return nil
		}
		reason = fmt.Sprintf("node %s (%s) stopped working on the run during %s without a result", c.id, c.cfg.NodeName, v.State)
	} else {
		for _, n := range v.Nodes {
			if n.ID == v.Owner && n.Alive {
				return nil
			}
		}
	}
	_, err := c.msgs.Append(ctx, conn, c.id, msglog.KindFailed, v.Run, failedData{Error: reason}, sameRun(v.Run, v.LastID))
	if errors.Is(err, msglog.ErrRefused) {
		return nil
	}
	if err != nil {
		return err
	}
	c.log.Warn("swo: run failed: " + reason)
	// The run can no longer commit ("done" would not follow "failed"), so
	// ending its sessions is safe, and it frees the stop-the-world lock if a
	// stalled leader still holds it.
	for _, lock := range []int32{lockConn, lockExec} {
		if n, err := c.keys.terminateExclusiveHolders(ctx, conn, lock); err == nil && n > 0 {
			c.log.Warn("swo: ended the sessions of the failed run", "sessions", n)
		}
	}
	return nil
}

// owns reports whether this node is doing the work of the run in v.
func (c *Connector) owns(v view) bool {
	if v.State == StateResetting {
		return c.resetting.Load() == v.Run
	}
	c.leadMu.Lock()
	defer c.leadMu.Unlock()
	return c.leading != nil && c.leading.run == v.Run
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

func (c *Connector) lastID() int64 {
	c.viewMu.Lock()
	defer c.viewMu.Unlock()
	return c.view.LastID
}

func (c *Connector) currentRun() int64 {
	c.viewMu.Lock()
	defer c.viewMu.Unlock()
	return c.view.Run
}

// currentView returns the view and a channel closed at its next change.
func (c *Connector) currentView() (view, <-chan struct{}) {
	c.viewMu.Lock()
	defer c.viewMu.Unlock()
	v := c.view
	v.At = maps.Clone(v.At) // apply writes to the map; the copy must not share it
	return v, c.viewChanged
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
