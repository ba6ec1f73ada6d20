package swo

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/pgswo/swo/internal/pgtest"
)

// Environment of a child node process (the test binary run again).
const (
	envChild     = "SWO_TEST_CHILD_NODE" // node number
	envChildOld  = "SWO_TEST_CHILD_OLD"
	envChildNext = "SWO_TEST_CHILD_NEXT"
	envChildAPI  = "SWO_TEST_CHILD_API_ONLY"
)

// childEvent is one line a child node writes to its stdout.
type childEvent struct {
	Event   string    `json:"event"` // ready, ack, error, executed, stopped
	Node    int       `json:"node,omitempty"`
	Worker  int       `json:"worker,omitempty"`
	Seq     int64     `json:"seq,omitempty"`
	Counter int       `json:"counter,omitempty"`
	DB      string    `json:"db,omitempty"`
	Start   time.Time `json:"start,omitempty"`
	End     time.Time `json:"end,omitempty"`
	Error   string    `json:"error,omitempty"`
}

// runChildNode is a service instance in a process of its own: a node with
// two writers that report every acknowledged write on stdout as it happens,
// and that obeys "execute" and "stop" on stdin.
func runChildNode() int {
	node, _ := strconv.Atoi(os.Getenv(envChild))
	var mu sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	emit := func(e childEvent) {
		mu.Lock()
		defer mu.Unlock()
		_ = enc.Encode(e)
	}
	ctx := context.Background()
	c, err := NewConnector(ctx, Config{
		OldURL: os.Getenv(envChildOld), NextURL: os.Getenv(envChildNext), NodeName: fmt.Sprintf("node-%d", node),
		APIOnly: os.Getenv(envChildAPI) == "1", PauseBudget: 5 * time.Second, SyncWorkers: 2,
		Logger: testLoggerTo(io.Discard), timing: testTimings,
	})
	if err != nil {
		emit(childEvent{Event: "error", Error: err.Error()})
		return 1
	}
	db := sql.OpenDB(c)
	db.SetMaxOpenConns(8)
	l := &load{stop: make(chan struct{}), report: func(a ack) {
		emit(childEvent{Event: "ack", Node: a.node, Worker: a.worker, Seq: a.seq, Counter: a.counter, DB: a.db, Start: a.start, End: a.end})
	}}
	for w := 0; w < 2; w++ {
		l.wg.Add(1)
		go l.run(db, node, w)
	}
	emit(childEvent{Event: "ready"})
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		switch sc.Text() {
		case "execute":
			go func() {
				err := c.Execute(ctx)
				emit(childEvent{Event: "executed", Error: errString(err)})
			}()
		case "stop":
			l.halt()
			for _, err := range l.errs {
				emit(childEvent{Event: "error", Error: err.Error()})
			}
			emit(childEvent{Event: "stopped"})
			db.Close()
			return 0
		}
	}
	return 0
}

// child is a child node seen from the test.
type child struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	mu     sync.Mutex
	acks   []ack
	errs   []string
	events chan childEvent // everything but acks
}

func startChild(t *testing.T, tc *testCluster, node int, apiOnly bool) *child {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envChild+"="+strconv.Itoa(node), envChildOld+"="+tc.old.URL, envChildNext+"="+tc.next.URL)
	if apiOnly {
		cmd.Env = append(cmd.Env, envChildAPI+"=1")
	}
	ch := &child{cmd: cmd, events: make(chan childEvent, 100)}
	var err error
	if ch.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var e childEvent
			if json.Unmarshal(sc.Bytes(), &e) != nil {
				continue
			}
			switch e.Event {
			case "ack":
				ch.mu.Lock()
				ch.acks = append(ch.acks, ack{node: e.Node, worker: e.Worker, seq: e.Seq, counter: e.Counter, db: e.DB, start: e.Start, end: e.End})
				ch.mu.Unlock()
			case "error":
				ch.mu.Lock()
				ch.errs = append(ch.errs, e.Error)
				ch.mu.Unlock()
				ch.events <- e
			default:
				ch.events <- e
			}
		}
		close(ch.events)
	}()
	ch.await(t, "ready")
	return ch
}

func (ch *child) send(t *testing.T, cmd string) {
	t.Helper()
	if _, err := io.WriteString(ch.stdin, cmd+"\n"); err != nil {
		t.Fatal(err)
	}
}

func (ch *child) await(t *testing.T, event string) childEvent {
	t.Helper()
	timeout := time.After(2 * time.Minute)
	for {
		select {
		case e, ok := <-ch.events:
			if !ok {
				t.Fatalf("child exited before %q", event)
			}
			if e.Event == event {
				return e
			}
			if e.Event == "error" {
				t.Errorf("child: %s", e.Error)
			}
		case <-timeout:
			t.Fatalf("child: no %q within 2 minutes", event)
		}
	}
}

func (ch *child) ackCount() int {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return len(ch.acks)
}

// TestSeparateProcesses runs nodes in processes of their own: one leads and
// is killed with SIGKILL in the middle of the copy; the others carry on,
// RESET and EXECUTE then switch every process under load, and every write
// any process acknowledged is in the new database.
func TestSeparateProcesses(t *testing.T) {
	tc := newCluster(t, 1, false, nil)
	seedNotes(t, tc, 200000) // a copy that takes a moment
	leader := startChild(t, tc, 1, false)
	follower := startChild(t, tc, 2, true)
	tc.awaitNodes(t, 3)
	ctx := testCtx(t)
	l := startLoad(tc, 2)
	defer l.halt()
	waitFor(t, func() bool { return leader.ackCount() > 50 && follower.ackCount() > 50 })
	if err := tc.nodes[0].Reset(ctx); err != nil {
		t.Fatal(err)
	}
	leader.send(t, "execute")
	waitFor(t, func() bool {
		s := tc.nodes[0].Status()
		return s.State == StateSyncing && s.Progress != nil && s.Progress.Phase == "initial copy"
	})
	if err := leader.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = leader.cmd.Wait()
	s := waitState(t, tc.nodes[0], StateFailed)
	t.Logf("leader killed during the copy; the run failed: %s", s.LastError)
	if err := tc.nodes[0].Reset(ctx); err != nil {
		t.Fatal(err)
	}
	if err := tc.nodes[0].Execute(ctx); err != nil {
		t.Fatal(err)
	}
	n := follower.ackCount()
	waitFor(t, func() bool { return follower.ackCount() > n+50 })
	follower.send(t, "stop")
	follower.await(t, "stopped")
	l.halt()
	for _, err := range l.errs {
		t.Errorf("application error in the test process: %v", err)
	}
	for _, e := range follower.errs {
		t.Errorf("application error in the follower process: %s", e)
	}
	acks := append(append(append([]ack{}, l.acks...), follower.acks...), leader.acks...)
	// The killed process may have had writes acknowledged that it had no
	// time to report: the ledger may hold more rows than known.
	checkAcks(t, tc, doneAt(t, tc), acks, false)
	if len(follower.acks) == 0 || follower.acks[len(follower.acks)-1].db != tc.next.Name {
		t.Error("the follower process did not end on the new database")
	}
}

// seedNotes adds n rows to notes in the old database.
func seedNotes(t *testing.T, tc *testCluster, n int) {
	t.Helper()
	conn := pgtest.Connect(t, tc.old.URL)
	if _, err := conn.Exec(testCtx(t), "INSERT INTO notes (body) SELECT repeat('x', 100) || i FROM generate_series(1, $1) i", n); err != nil {
		t.Fatal(err)
	}
}
