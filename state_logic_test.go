package swo

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/pgswo/swo/internal/cluster"
	"github.com/pgswo/swo/internal/msglog"
)

// Pure tests of the state machine the nodes fold from the message log, of
// the owner check and of the node checks: no database.

var (
	nodeA = uuid.MustParse("aaaaaaaa-0000-4000-8000-000000000001") // resets
	nodeB = uuid.MustParse("bbbbbbbb-0000-4000-8000-000000000002") // leads
	nodeC = uuid.MustParse("cccccccc-0000-4000-8000-000000000003") // another node
	dbX   = uuid.MustParse("dddddddd-0000-4000-8000-000000000004") // a database identity
)

// logT0 is the database clock of message 0; message id i is appended at
// logT0 + i seconds, so that every message has its own At.
var logT0 = time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)

func atOf(id int64) time.Time { return logT0.Add(time.Duration(id) * time.Second) }

// entry is one message to append to a fakeLog.
type entry struct {
	kind string
	node uuid.UUID
	data any
	run  int64 // 0: msglog's rule (a reset starts run = its id; others join the current run)
}

// fakeLog numbers messages as msglog.Log.Append does: dense ids from 1, a
// reset's run is its own id, any other message joins the run of the last
// message unless it names one; data is stored as JSON ("{}" for nil).
type fakeLog struct{ msgs []msglog.Message }

func (l *fakeLog) add(e entry) msglog.Message {
	id := int64(len(l.msgs)) + 1
	run := e.run
	if run == 0 && len(l.msgs) > 0 {
		run = l.msgs[len(l.msgs)-1].Run
	}
	if e.kind == msglog.KindReset {
		run = id
	}
	raw := json.RawMessage("{}")
	if e.data != nil {
		b, err := json.Marshal(e.data)
		if err != nil {
			panic(err)
		}
		raw = b
	}
	m := msglog.Message{ID: id, At: atOf(id), Node: e.node, Kind: e.kind, Run: run, Data: raw}
	l.msgs = append(l.msgs, m)
	return m
}

func buildLog(es ...entry) []msglog.Message {
	var l fakeLog
	for _, e := range es {
		l.add(e)
	}
	return l.msgs
}

// Shorthands for the messages of a run.
func eReset(node uuid.UUID) entry { return entry{kind: msglog.KindReset, node: node} }
func eIdle() entry                { return entry{kind: msglog.KindIdle, node: nodeA} }
func eExecute(leader uuid.UUID) entry {
	// EXECUTE is pressed on node A; the message names the leader.
	return entry{kind: msglog.KindExecute, node: nodeA, data: executeData{Leader: leader}}
}
func ePrepare() entry { return entry{kind: msglog.KindPrepare, node: nodeB} }
func ePause(budget, final int64) entry {
	return entry{kind: msglog.KindPause, node: nodeB, data: pauseData{BudgetMS: budget, FinalMS: final}}
}
func eExecuting() entry       { return entry{kind: msglog.KindExecuting, node: nodeB} }
func eDone(d doneData) entry  { return entry{kind: msglog.KindDone, node: nodeB, data: d} }
func eFailed(f failure) entry { return entry{kind: msglog.KindFailed, node: nodeB, data: f} }
func eConfirm() entry         { return entry{kind: msglog.KindConfirm, node: nodeC} }

// step is one message and what applying it must do.
type step struct {
	e       entry
	changed bool  // apply reports a state change
	state   State // the state after it
}

// finalView is what the view must hold after the last step.
type finalView struct {
	run    int64
	owner  uuid.UUID
	leader uuid.UUID
	at     map[string]int64 // kind -> id of the message whose At the view keeps
	err    failure
	pause  pauseData
	done   doneData
}

func TestDeriveAndApply(t *testing.T) {
	t.Parallel()
	precondFailure := failure{
		Error: "reset failed: preconditions not met: 2 problem(s)",
		Code:  "preconditions",
		Problems: []Problem{
			{Object: "public.orders", Issue: "no primary key"},
			{Object: "node web-2", Issue: "nodes disagree on the next database"},
		},
	}
	budgetFailure := failure{Error: "pause budget exceeded (Config.PauseBudget 3s): 2 transactions still open", Code: "pause_budget"}
	done := doneData{To: dbX, PauseMS: 420, FinalMS: 180, Changes: 17}

	cases := []struct {
		name  string
		steps []step
		want  finalView
	}{{
		name: "happy path reset, idle, execute, prepare, pause, executing, done, confirm",
		steps: []step{
			{eReset(nodeA), true, StateResetting},
			{eIdle(), true, StateIdle},
			{eExecute(nodeB), true, StateSyncing},
			{ePrepare(), false, StateSyncing}, // prepare does not move the state
			{ePause(3000, 10000), true, StatePausing},
			{eExecuting(), true, StateExecuting},
			{eDone(done), true, StateDone},
			{eConfirm(), false, StateDone}, // nor does a confirmation
		},
		want: finalView{
			run: 1, owner: nodeB, leader: nodeB,
			at:    map[string]int64{"reset": 1, "idle": 2, "execute": 3, "pause": 5, "executing": 6, "done": 7},
			pause: pauseData{BudgetMS: 3000, FinalMS: 10000},
			done:  done,
		},
	}, {
		name: "a failed RESET: the resetter keeps owning the run, the failure is decoded",
		steps: []step{
			{eReset(nodeA), true, StateResetting},
			{entry{kind: msglog.KindFailed, node: nodeA, data: precondFailure}, true, StateFailed},
			{eIdle(), false, StateFailed},         // a failed run does not become idle
			{eExecute(nodeB), false, StateFailed}, // nor start
		},
		want: finalView{run: 1, owner: nodeA, at: map[string]int64{"reset": 1, "failed": 2}, err: precondFailure},
	}, {
		name: "a run that fails while pausing keeps its pause data and owner",
		steps: []step{
			{eReset(nodeA), true, StateResetting},
			{eIdle(), true, StateIdle},
			{eExecute(nodeB), true, StateSyncing},
			{ePause(2500, 8000), true, StatePausing},
			{eFailed(budgetFailure), true, StateFailed},
			{ePause(1, 1), false, StateFailed}, // pause after failed is ignored
			{eExecuting(), false, StateFailed},
			{eDone(done), false, StateFailed}, // a failed run never commits
		},
		want: finalView{
			run: 1, owner: nodeB, leader: nodeB,
			at:    map[string]int64{"reset": 1, "idle": 2, "execute": 3, "pause": 4, "failed": 5},
			err:   budgetFailure,
			pause: pauseData{BudgetMS: 2500, FinalMS: 8000},
		},
	}, {
		name: "messages the transitions table does not allow are ignored",
		steps: []step{
			{eIdle(), false, StateUnknown}, // before any RESET
			{eExecute(nodeB), false, StateUnknown},
			{eReset(nodeA), true, StateResetting},
			{eExecute(nodeB), false, StateResetting}, // EXECUTE needs idle
			{ePause(1, 1), false, StateResetting},
			{eIdle(), true, StateIdle},
			{eDone(done), false, StateIdle}, // done straight after idle
			{eExecuting(), false, StateIdle},
			{ePause(1, 1), false, StateIdle},
			{eIdle(), false, StateIdle}, // idle -> idle is no transition
			{eExecute(nodeC), true, StateSyncing},
			{eExecute(nodeB), false, StateSyncing}, // a second EXECUTE does not change the leader
			{eExecuting(), false, StateSyncing},    // the pause comes first
			{eDone(done), false, StateSyncing},
			{eIdle(), false, StateSyncing},
			{ePause(100, 200), true, StatePausing},
			{ePause(300, 400), false, StatePausing}, // the second pause's data is not taken
			{eDone(done), false, StatePausing},      // done needs executing
			{eExecute(nodeB), false, StatePausing},
			{eExecuting(), true, StateExecuting},
			{ePause(1, 1), false, StateExecuting},
			{eIdle(), false, StateExecuting},
		},
		want: finalView{
			run: 3, owner: nodeC, leader: nodeC,
			at:    map[string]int64{"reset": 3, "idle": 6, "execute": 11, "pause": 16, "executing": 20},
			pause: pauseData{BudgetMS: 100, FinalMS: 200},
		},
	}, {
		name: "done is final: nothing of the run moves it",
		steps: []step{
			{eReset(nodeA), true, StateResetting},
			{eIdle(), true, StateIdle},
			{eExecute(nodeB), true, StateSyncing},
			{ePause(1000, 2000), true, StatePausing},
			{eExecuting(), true, StateExecuting},
			{eDone(done), true, StateDone},
			{eFailed(budgetFailure), false, StateDone},
			{eDone(doneData{To: nodeC}), false, StateDone},
			{eIdle(), false, StateDone},
		},
		want: finalView{
			run: 1, owner: nodeB, leader: nodeB,
			at:    map[string]int64{"reset": 1, "idle": 2, "execute": 3, "pause": 4, "executing": 5, "done": 6},
			pause: pauseData{BudgetMS: 1000, FinalMS: 2000},
			done:  done,
		},
	}, {
		name: "messages of an older run are ignored",
		steps: []step{
			{eReset(nodeA), true, StateResetting}, // run 1
			{eIdle(), true, StateIdle},
			{eExecute(nodeB), true, StateSyncing},
			{eReset(nodeC), true, StateResetting}, // run 4
			// The leader of run 1 did not notice yet.
			{entry{kind: msglog.KindPause, node: nodeB, run: 1, data: pauseData{BudgetMS: 9, FinalMS: 9}}, false, StateResetting},
			{entry{kind: msglog.KindIdle, node: nodeA, run: 1}, false, StateResetting},
			{entry{kind: msglog.KindFailed, node: nodeB, run: 1, data: budgetFailure}, false, StateResetting},
			{entry{kind: msglog.KindIdle, node: nodeC, run: 4}, true, StateIdle},
			{entry{kind: msglog.KindExecute, node: nodeA, run: 1, data: executeData{Leader: nodeB}}, false, StateIdle},
			{entry{kind: msglog.KindExecute, node: nodeA, run: 99, data: executeData{Leader: nodeB}}, false, StateIdle}, // a run not started yet
		},
		want: finalView{run: 4, owner: nodeC, at: map[string]int64{"reset": 4, "idle": 8}},
	}, {
		name: "the owner is the resetter, then the leader the EXECUTE message names",
		steps: []step{
			{eReset(nodeC), true, StateResetting},
			{entry{kind: msglog.KindIdle, node: nodeC}, true, StateIdle},
			// Pressed on node A, led by node B.
			{entry{kind: msglog.KindExecute, node: nodeA, data: executeData{Leader: nodeB}}, true, StateSyncing},
		},
		want: finalView{run: 1, owner: nodeB, leader: nodeB, at: map[string]int64{"reset": 1, "idle": 2, "execute": 3}},
	}, {
		name: "a failure from the owner check (text only) after executing",
		steps: []step{
			{eReset(nodeA), true, StateResetting},
			{eIdle(), true, StateIdle},
			{eExecute(nodeB), true, StateSyncing},
			{ePause(1, 2), true, StatePausing},
			{eExecuting(), true, StateExecuting},
			{entry{kind: msglog.KindFailed, node: nodeC, data: failure{Error: "node B stopped answering during executing"}}, true, StateFailed},
		},
		want: finalView{
			run: 1, owner: nodeB, leader: nodeB,
			at:    map[string]int64{"reset": 1, "idle": 2, "execute": 3, "pause": 4, "executing": 5, "failed": 6},
			err:   failure{Error: "node B stopped answering during executing"},
			pause: pauseData{BudgetMS: 1, FinalMS: 2},
		},
	}, {
		name: "RESET while resetting: the second RESET takes over",
		steps: []step{
			{eReset(nodeA), true, StateResetting},
			{eReset(nodeC), true, StateResetting},
			{entry{kind: msglog.KindIdle, node: nodeA, run: 1}, false, StateResetting}, // the first RESET's result
		},
		want: finalView{run: 2, owner: nodeC, at: map[string]int64{"reset": 2}},
	}}

	// A RESET in the middle of every state but done starts a new run from
	// scratch: no leader, no failure, no pause data, only the reset's time.
	prefixes := []struct {
		state State
		steps []entry
	}{
		{StateResetting, []entry{eReset(nodeA)}},
		{StateIdle, []entry{eReset(nodeA), eIdle()}},
		{StateSyncing, []entry{eReset(nodeA), eIdle(), eExecute(nodeB)}},
		{StatePausing, []entry{eReset(nodeA), eIdle(), eExecute(nodeB), ePause(5, 6)}},
		{StateExecuting, []entry{eReset(nodeA), eIdle(), eExecute(nodeB), ePause(5, 6), eExecuting()}},
		{StateFailed, []entry{eReset(nodeA), eIdle(), eExecute(nodeB), eFailed(budgetFailure)}},
		{StateFailed, []entry{eReset(nodeA), eFailed(precondFailure)}},
	}
	for _, p := range prefixes {
		var steps []step
		for _, e := range p.steps {
			steps = append(steps, step{e: e, changed: true})
		}
		steps[len(steps)-1].state = p.state
		for i := range steps[:len(steps)-1] {
			steps[i].state = -1 // not checked: the prefix's own path is tested above
		}
		resetID := int64(len(steps) + 1)
		steps = append(steps, step{eReset(nodeC), true, StateResetting})
		cases = append(cases, struct {
			name  string
			steps []step
			want  finalView
		}{
			name:  fmt.Sprintf("RESET during %s (after %d messages) starts run %d", p.state, len(p.steps), resetID),
			steps: steps,
			want:  finalView{run: resetID, owner: nodeC, at: map[string]int64{"reset": resetID}},
		})
	}

	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var l fakeLog
			var v view
			nodes := []cluster.Node{{ID: nodeA, Name: "a", Alive: true}}
			v.Nodes = nodes // the node list is the heartbeat's, not the log's: a RESET keeps it
			var lastSince time.Time
			for i, s := range tc.steps {
				m := l.add(s.e)
				now := time.Date(2030, 1, 1, 0, 0, i, 0, time.Local) // the node's own clock
				before := v.State
				got := v.apply(m, now)
				if got != s.changed {
					t.Errorf("step %d (%s, run %d) from %s: apply reported changed=%v, want %v", i+1, m.Kind, m.Run, before, got, s.changed)
				}
				if s.state >= 0 && v.State != s.state {
					t.Errorf("step %d (%s, run %d) from %s: state %s, want %s", i+1, m.Kind, m.Run, before, v.State, s.state)
				}
				if !got && v.State != before {
					t.Errorf("step %d: apply said unchanged but the state moved %s -> %s", i+1, before, v.State)
				}
				if got {
					lastSince = now
				}
				if v.LastID != m.ID {
					t.Errorf("step %d: LastID %d, want %d (every message read counts, applied or not)", i+1, v.LastID, m.ID)
				}
			}
			checkFinal(t, v, tc.want, l.msgs)
			if !v.Since.Equal(lastSince) {
				t.Errorf("Since = %v, want %v (the node's time of the last state change)", v.Since, lastSince)
			}
			if !reflect.DeepEqual(v.Nodes, nodes) {
				t.Errorf("Nodes = %v, want the heartbeat's list %v kept", v.Nodes, nodes)
			}

			// derive folds the same log to the same view.
			now := time.Date(2031, 1, 1, 0, 0, 0, 0, time.UTC)
			d := derive(l.msgs, now)
			if d.State != v.State {
				t.Fatalf("derive: state %s, apply step by step: %s", d.State, v.State)
			}
			checkFinal(t, d, tc.want, l.msgs)
			if d.Nodes != nil {
				t.Errorf("derive: Nodes = %v, want none (the log holds no node list)", d.Nodes)
			}
			if d.LastID != int64(len(l.msgs)) {
				t.Errorf("derive: LastID %d, want %d", d.LastID, len(l.msgs))
			}
			if d.State != StateUnknown && !d.Since.Equal(now) {
				t.Errorf("derive: Since = %v, want %v", d.Since, now)
			}
		})
	}
}

func checkFinal(t *testing.T, v view, want finalView, msgs []msglog.Message) {
	t.Helper()
	if v.Run != want.run {
		t.Errorf("Run = %d, want %d", v.Run, want.run)
	}
	if v.Owner != want.owner {
		t.Errorf("Owner = %s, want %s", v.Owner, want.owner)
	}
	if v.Leader != want.leader {
		t.Errorf("Leader = %s, want %s", v.Leader, want.leader)
	}
	if !reflect.DeepEqual(v.Err, want.err) {
		t.Errorf("Err = %+v, want %+v", v.Err, want.err)
	}
	if v.Pause != want.pause {
		t.Errorf("Pause = %+v, want %+v", v.Pause, want.pause)
	}
	if v.Done != want.done {
		t.Errorf("Done = %+v, want %+v", v.Done, want.done)
	}
	if len(v.At) != len(want.at) {
		t.Errorf("At holds %v, want the kinds %v", v.At, want.at)
	}
	for kind, id := range want.at {
		m := msgs[id-1]
		if m.Kind != kind {
			t.Fatalf("test bug: message %d is a %s, not a %s", id, m.Kind, kind)
		}
		if got, ok := v.At[kind]; !ok || !got.Equal(m.At) {
			t.Errorf("At[%s] = %v (present %v), want %v (message %d)", kind, got, ok, m.At, id)
		}
	}
}

// The failure a node appended reaches every node's view with its identity.
func TestDeriveFailureKeepsIdentity(t *testing.T) {
	t.Parallel()
	probs := []Problem{{Object: "public.a", Issue: "no primary key"}, {Object: "public.b.c", Issue: "column missing"}}
	cases := []struct {
		name     string
		err      error
		sentinel error
		problems []Problem
	}{
		{"pause budget", fmt.Errorf("final sync: %w (Config.PauseBudget 3s)", ErrPauseBudget), ErrPauseBudget, nil},
		{"target not empty", fmt.Errorf("check: %w: public.t", ErrTargetNotEmpty), ErrTargetNotEmpty, nil},
		{"preconditions", fmt.Errorf("check: %w", &PreconditionError{Problems: probs}), ErrPreconditions, probs},
		{"plain", errors.New("connection reset by peer"), nil, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			msgs := buildLog(eReset(nodeA), eIdle(), eExecute(nodeB), eFailed(encodeFailure(tc.err)))
			v := derive(msgs, time.Now())
			if v.State != StateFailed {
				t.Fatalf("state %s, want failed", v.State)
			}
			got := v.Err.err()
			if got == nil || got.Error() != tc.err.Error() {
				t.Fatalf("error %v, want the text %q", got, tc.err.Error())
			}
			for _, s := range sentinels() {
				if errors.Is(got, s) != (s == tc.sentinel) {
					t.Errorf("errors.Is(%v) = %v, want %v", s, errors.Is(got, s), s == tc.sentinel)
				}
			}
			var pe *PreconditionError
			if errors.As(got, &pe) != (tc.problems != nil) {
				t.Fatalf("errors.As(*PreconditionError) = %v, want %v", pe != nil, tc.problems != nil)
			}
			if pe != nil && !reflect.DeepEqual(pe.Problems, tc.problems) {
				t.Errorf("problems %v, want %v", pe.Problems, tc.problems)
			}
		})
	}
}

// derive must not depend on anything but the messages: two nodes reading
// the same log agree, and reading it in two halves gives the same view.
func TestDeriveIncremental(t *testing.T) {
	t.Parallel()
	msgs := buildLog(eReset(nodeA), eIdle(), eExecute(nodeB), ePrepare(),
		eReset(nodeC), entry{kind: msglog.KindPause, node: nodeB, run: 1, data: pauseData{BudgetMS: 1}},
		entry{kind: msglog.KindIdle, node: nodeC, run: 5}, eExecute(nodeC), ePause(10, 20), eExecuting())
	now := time.Now()
	whole := derive(msgs, now)
	for cut := 0; cut <= len(msgs); cut++ {
		v := derive(msgs[:cut], now)
		for _, m := range msgs[cut:] {
			v.apply(m, now)
		}
		if !reflect.DeepEqual(v, whole) {
			t.Errorf("read in two parts at %d: %+v, want %+v", cut, v, whole)
		}
	}
	if whole.State != StateExecuting || whole.Run != 5 || whole.Leader != nodeC || whole.Pause != (pauseData{BudgetMS: 10, FinalMS: 20}) {
		t.Errorf("whole log: %+v, want executing run 5 led by C with pause 10/20", whole)
	}
}

func TestOwnerLost(t *testing.T) {
	t.Parallel()
	const timeout = 5 * time.Second
	alive := func(id uuid.UUID, name string) cluster.Node { return cluster.Node{ID: id, Name: name, Alive: true} }
	dead := func(id uuid.UUID, name string) cluster.Node { return cluster.Node{ID: id, Name: name} }
	self := nodeA
	cases := []struct {
		name  string
		state State
		owner uuid.UUID
		owned bool
		in    time.Duration
		nodes []cluster.Node
		want  []string // substrings of the reason; nil: no reason
	}{
		{"unknown is no run", StateUnknown, nodeB, false, time.Hour, nil, nil},
		{"idle is no run", StateIdle, nodeB, false, time.Hour, []cluster.Node{dead(nodeB, "web-b")}, nil},
		{"failed is no run", StateFailed, nodeB, false, time.Hour, []cluster.Node{dead(nodeB, "web-b")}, nil},
		{"done is no run", StateDone, nodeB, false, time.Hour, []cluster.Node{dead(nodeB, "web-b")}, nil},
		{"idle owned by self not working", StateIdle, self, false, time.Hour, nil, nil},

		{"syncing, dead owner, state younger than the timeout", StateSyncing, nodeB, false, timeout - time.Millisecond, []cluster.Node{dead(nodeB, "web-b")}, nil},
		{"resetting, self not working, younger than the timeout", StateResetting, self, false, 0, nil, nil},
		{"syncing, dead owner, state exactly the timeout old", StateSyncing, nodeB, false, timeout, []cluster.Node{dead(nodeB, "web-b")},
			[]string{nodeB.String(), "web-b", "syncing"}},

		{"resetting, self owns and works", StateResetting, self, true, time.Hour, []cluster.Node{alive(self, "web-a")}, nil},
		{"executing, self owns and works though listed dead", StateExecuting, self, true, time.Hour, []cluster.Node{dead(self, "web-a")}, nil},
		{"resetting, self owns but stopped", StateResetting, self, false, time.Hour, []cluster.Node{alive(self, "web-a")},
			[]string{self.String(), "web-a", "resetting"}},
		{"pausing, self owns but stopped", StatePausing, self, false, time.Minute, []cluster.Node{alive(self, "web-a"), alive(nodeB, "web-b")},
			[]string{self.String(), "web-a", "pausing"}},

		{"syncing, another owner alive", StateSyncing, nodeB, false, time.Hour, []cluster.Node{alive(self, "web-a"), alive(nodeB, "web-b")}, nil},
		{"syncing, another owner alive, owned flag irrelevant", StateSyncing, nodeB, true, time.Hour, []cluster.Node{alive(nodeB, "web-b")}, nil},
		{"resetting, resetter alive", StateResetting, nodeC, false, time.Hour, []cluster.Node{alive(nodeC, "web-c")}, nil},
		{"pausing, owner dead", StatePausing, nodeB, false, time.Hour, []cluster.Node{alive(self, "web-a"), dead(nodeB, "web-b")},
			[]string{nodeB.String(), "web-b", "pausing"}},
		{"executing, owner dead", StateExecuting, nodeB, false, time.Hour, []cluster.Node{dead(nodeB, "web-b"), alive(nodeC, "web-c")},
			[]string{nodeB.String(), "web-b", "executing"}},
		{"resetting, resetter dead", StateResetting, nodeC, true, time.Hour, []cluster.Node{alive(self, "web-a"), dead(nodeC, "web-c")},
			[]string{nodeC.String(), "web-c", "resetting"}},
		{"syncing, owner absent from the list", StateSyncing, nodeB, false, time.Hour, []cluster.Node{alive(self, "web-a"), alive(nodeC, "web-c")},
			[]string{nodeB.String(), "syncing"}},
		{"syncing, empty node list", StateSyncing, nodeB, false, time.Hour, nil, []string{nodeB.String()}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			v := view{State: tc.state, Run: 7, Owner: tc.owner, Nodes: tc.nodes}
			got := ownerLost(v, self, tc.owned, tc.in, timeout)
			if tc.want == nil {
				if got != "" {
					t.Fatalf("ownerLost = %q, want no reason", got)
				}
				return
			}
			if got == "" {
				t.Fatalf("ownerLost = \"\", want a reason naming %v", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(got, w) {
					t.Errorf("reason %q does not mention %q", got, w)
				}
			}
			// The reason names the owner, not some other listed node.
			for _, n := range tc.nodes {
				if n.ID != tc.owner && (strings.Contains(got, n.ID.String()) || strings.Contains(got, n.Name)) {
					t.Errorf("reason %q names node %s (%s), which is not the owner", got, n.ID, n.Name)
				}
			}
		})
	}
}

func TestNodeProblems(t *testing.T) {
	t.Parallel()
	next, other := uuid.MustParse("11111111-0000-4000-8000-000000000001"), uuid.MustParse("22222222-0000-4000-8000-000000000002")
	n := func(id uuid.UUID, name string, alive bool, nextID uuid.UUID, cfgErr string) cluster.Node {
		return cluster.Node{ID: id, Name: name, Alive: alive, CanExec: true, NextID: nextID, ConfigError: cfgErr}
	}
	cases := []struct {
		name    string
		nodes   []cluster.Node
		want    []string // nodes that must be named, with a fragment of their problem
		notWant []string // names that must not appear
		count   int
	}{
		{"no nodes", nil, nil, nil, 0},
		{"all agree", []cluster.Node{n(nodeA, "web-a", true, next, ""), n(nodeB, "web-b", true, next, "")}, nil, nil, 0},
		{"a dead node's error does not count",
			[]cluster.Node{n(nodeA, "web-a", true, next, ""), n(nodeB, "web-b", false, next, "next database unreachable")}, nil, nil, 0},
		{"a dead node's other next database does not count",
			[]cluster.Node{n(nodeA, "web-a", true, next, ""), n(nodeB, "web-b", false, other, "")}, nil, nil, 0},
		{"one node's own error",
			[]cluster.Node{n(nodeA, "web-a", true, next, ""), n(nodeB, "web-b", true, uuid.Nil, "next database unreachable: dial tcp: refused")},
			[]string{"node web-b: next database unreachable: dial tcp: refused"}, []string{"web-a"}, 1},
		{"two nodes disagree",
			[]cluster.Node{n(nodeA, "web-a", true, next, ""), n(nodeB, "web-b", true, other, ""), n(nodeC, "web-c", false, uuid.Nil, "x")},
			[]string{"node web-a: nodes disagree", "node web-b: nodes disagree", next.String(), other.String()}, []string{"node web-c"}, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := nodeProblems(tc.nodes)
			if tc.count == 0 {
				if err != nil {
					t.Fatalf("nodeProblems = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("nodeProblems = nil, want %d problem(s)", tc.count)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, fmt.Sprintf("%d node(s)", tc.count)) {
				t.Errorf("%q does not start with the count %d", msg, tc.count)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("%q does not contain %q", msg, w)
				}
			}
			for _, w := range tc.notWant {
				if strings.Contains(msg, w) {
					t.Errorf("%q names %q, which has no problem or is not alive", msg, w)
				}
			}
		})
	}
}

// The payloads as the log stores them (JSON written by any version of a
// node): field names are part of the stored format.
func TestDeriveStoredPayloads(t *testing.T) {
	t.Parallel()
	raw := func(id int64, node uuid.UUID, kind, data string) msglog.Message {
		return msglog.Message{ID: id, At: atOf(id), Node: node, Kind: kind, Run: 1, Data: json.RawMessage(data)}
	}
	msgs := []msglog.Message{
		raw(1, nodeA, msglog.KindReset, `{}`),
		raw(2, nodeA, msglog.KindIdle, `{}`),
		raw(3, nodeA, msglog.KindExecute, `{"leader":"`+nodeB.String()+`"}`),
		raw(4, nodeB, msglog.KindPrepare, `{}`),
		raw(5, nodeB, msglog.KindPause, `{"budget_ms":3000,"final_ms":10000}`),
		raw(6, nodeB, msglog.KindExecuting, `{}`),
		raw(7, nodeB, msglog.KindDone, `{"to":"`+dbX.String()+`","pause_ms":512,"final_ms":256,"changes":42}`),
	}
	v := derive(msgs, time.Now())
	if v.State != StateDone || v.Leader != nodeB || v.Owner != nodeB {
		t.Fatalf("state %s leader %s owner %s, want done led and owned by %s", v.State, v.Leader, v.Owner, nodeB)
	}
	if v.Pause != (pauseData{BudgetMS: 3000, FinalMS: 10000}) {
		t.Errorf("Pause = %+v", v.Pause)
	}
	if v.Done != (doneData{To: dbX, PauseMS: 512, FinalMS: 256, Changes: 42}) {
		t.Errorf("Done = %+v", v.Done)
	}

	failed := derive([]msglog.Message{
		raw(1, nodeA, msglog.KindReset, `{}`),
		raw(2, nodeA, msglog.KindFailed, `{"error":"t","code":"target_not_empty","problems":[{"object":"public.t","issue":"holds rows"}]}`),
	}, time.Now())
	want := failure{Error: "t", Code: "target_not_empty", Problems: []Problem{{Object: "public.t", Issue: "holds rows"}}}
	if failed.State != StateFailed || !reflect.DeepEqual(failed.Err, want) {
		t.Errorf("failed view: %s %+v, want failed %+v", failed.State, failed.Err, want)
	}
}
