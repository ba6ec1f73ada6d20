package main

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgswo/swo"
	"github.com/pgswo/swo/internal/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// result is one run of the command.
type result struct {
	code           int
	stdout, stderr string
}

// swoctl runs the command in-process and checks that no password of dbs
// appears in what it printed.
func swoctl(t *testing.T, dbs []*pgtest.Database, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	start := time.Now()
	code := run(testCtx(t), args, &out, &errOut)
	r := result{code, out.String(), errOut.String()}
	name := strings.Join(append([]string{"swoctl"}, args...), " ")
	for _, d := range dbs {
		name = strings.ReplaceAll(name, d.Password, "xxxxx")
	}
	t.Logf("%s: exit %d in %v\nstdout:\n%s\nstderr:\n%s", name, code, time.Since(start).Round(time.Millisecond), r.stdout, r.stderr)
	for _, d := range dbs {
		if strings.Contains(r.stdout+r.stderr, d.Password) {
			t.Fatalf("%s printed the password of %s", name, d.Name)
		}
	}
	return r
}

func urls(old, next *pgtest.Database) []string {
	return []string{"--db-url=" + old.URL, "--db-url-next=" + next.URL}
}

// waitFor polls cond until it holds (the library offers no event for a
// node's first heartbeat).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		<-tick.C
	}
}

// logTo keeps a connector's logs and shows them if the test fails.
func logTo(t *testing.T) *slog.Logger {
	w := &lockedWriter{w: &bytes.Buffer{}}
	t.Cleanup(func() {
		if t.Failed() {
			w.mu.Lock()
			t.Logf("service logs:\n%s", w.w.(*bytes.Buffer).String())
			w.mu.Unlock()
		}
	})
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

// TestCheckListsProblemsAndChangesNothing: check on schemas that cannot be
// switched exits 2, lists every problem on a line of its own, and leaves
// both databases as they were (no swo schema, no trigger).
func TestCheckListsProblemsAndChangesNothing(t *testing.T) {
	old, next := pgtest.NewDatabase(t, pgtest.Owner("app")), pgtest.NewDatabase(t, pgtest.Owner("app"))
	pgtest.Exec(t, old.URL, `CREATE TABLE nokey (v int); CREATE TABLE cols (id int PRIMARY KEY, a int, b text)`)
	pgtest.Exec(t, next.URL, `CREATE TABLE nokey (v int); CREATE TABLE cols (id int PRIMARY KEY, a int)`)
	dbs := []*pgtest.Database{old, next}

	r := swoctl(t, dbs, append([]string{"check"}, urls(old, next)...)...)
	if r.code != exitNotReady {
		t.Fatalf("exit %d, want %d", r.code, exitNotReady)
	}
	lines := strings.Split(r.stderr, "\n")
	for _, want := range []string{"  - public.nokey: ", "  - public.cols.b: "} {
		if !slices.ContainsFunc(lines, func(l string) bool { return strings.HasPrefix(l, want) }) {
			t.Errorf("no line starting %q", want)
		}
	}
	if !strings.HasPrefix(lines[0], "swoctl check: swo: preconditions not met: ") {
		t.Errorf("first line: %q", lines[0])
	}
	ctx := testCtx(t)
	for _, d := range dbs {
		var schemas, triggers int
		err := pgtest.Connect(t, d.URL).QueryRow(ctx, `SELECT (SELECT count(*) FROM pg_namespace WHERE nspname = 'swo'),
			(SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal)`).Scan(&schemas, &triggers)
		if err != nil || schemas != 0 || triggers != 0 {
			t.Errorf("%s changed by check: %d swo schemas, %d triggers, %v", d.Name, schemas, triggers, err)
		}
	}

	// Fixed, check passes.
	pgtest.Exec(t, old.URL, "ALTER TABLE nokey ADD PRIMARY KEY (v)")
	pgtest.Exec(t, next.URL, "ALTER TABLE nokey ADD PRIMARY KEY (v); ALTER TABLE cols ADD COLUMN b text")
	if r := swoctl(t, dbs, append([]string{"check"}, urls(old, next)...)...); r.code != exitOK {
		t.Fatalf("check once fixed: exit %d", r.code)
	}
}

// TestResetRefusedOnPreconditions: a RESET that fails on the preconditions
// exits 2 (not 3), listing each problem; status shows the failure and its
// problems.
func TestResetRefusedOnPreconditions(t *testing.T) {
	old, next := pgtest.NewDatabase(t, pgtest.Owner("app")), pgtest.NewDatabase(t, pgtest.Owner("app"))
	pgtest.Exec(t, old.URL, `CREATE TABLE nokey (v int)`)
	pgtest.Exec(t, next.URL, `CREATE TABLE nokey (v int)`)
	dbs := []*pgtest.Database{old, next}
	service, err := swo.NewConnector(testCtx(t), swo.Config{OldURL: old.URL, NextURL: next.URL, NodeName: "web-1", Logger: logTo(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer service.Close()

	r := swoctl(t, dbs, append([]string{"reset"}, urls(old, next)...)...)
	if r.code != exitNotReady || !strings.Contains(r.stderr, "\n  - public.nokey: ") || !strings.Contains(r.stderr, "reset failed") {
		t.Fatalf("reset: exit %d", r.code)
	}
	r = swoctl(t, dbs, append([]string{"status"}, urls(old, next)...)...)
	if r.code != exitOK || !strings.Contains(r.stdout, "state:    failed") || !strings.Contains(r.stdout, "\n  - public.nokey: ") {
		t.Fatalf("status: exit %d", r.code)
	}
}

// writer is the service's traffic: inserts with the test's own keys (no
// sequence, so that the tables can be made equal again after the switch),
// until it has written a few rows on the new database or is stopped.
type writer struct {
	stop chan struct{}
	done chan struct{}

	mu     sync.Mutex
	onOld  []int64
	onNext []int64
	errs   []error
	nextDB string
}

func startWriter(db *sql.DB, nextDB string) *writer {
	w := &writer{stop: make(chan struct{}), done: make(chan struct{}), nextDB: nextDB}
	go func() {
		defer close(w.done)
		for id := int64(1); ; id++ {
			select {
			case <-w.stop:
				return
			default:
			}
			var name string
			err := db.QueryRowContext(context.Background(),
				"INSERT INTO events (id, note) VALUES ($1, 'written') RETURNING current_database()", id).Scan(&name)
			w.mu.Lock()
			switch {
			case err != nil:
				w.errs = append(w.errs, err)
			case name == w.nextDB:
				w.onNext = append(w.onNext, id)
			default:
				w.onOld = append(w.onOld, id)
			}
			enough := len(w.onNext) >= 3 || len(w.errs) > 10
			w.mu.Unlock()
			if enough {
				return
			}
		}
	}()
	return w
}

// TestOperatorFlow runs the operator's flow with the command against a
// service of one instance writing through its connector: status (JSON, and
// the URLs from the service's environment), EXECUTE refused before RESET,
// RESET, EXECUTE with progress, the service on the new database with every
// acknowledged write, verify (differences after the service wrote on the new
// database, none once those rows are gone), and RESET refused after the
// switch.
func TestOperatorFlow(t *testing.T) {
	ctx := testCtx(t)
	old, next := pgtest.NewDatabase(t, pgtest.Owner("app")), pgtest.NewDatabase(t, pgtest.Owner("app"))
	dbs := []*pgtest.Database{old, next}
	schema := `CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL);
CREATE TABLE events (id bigint PRIMARY KEY, note text NOT NULL);`
	pgtest.Exec(t, old.URL, schema+`INSERT INTO accounts (name) SELECT 'a' || i FROM generate_series(1, 5000) i;`)
	pgtest.Exec(t, next.URL, schema)

	service, err := swo.NewConnector(ctx, swo.Config{OldURL: old.URL, NextURL: next.URL, NodeName: "web-1", Logger: logTo(t)})
	if err != nil {
		t.Fatal(err)
	}
	db := sql.OpenDB(service)
	defer db.Close()
	self := service.Status().Node.ID
	waitFor(t, "the service's first heartbeat", func() bool {
		return slices.ContainsFunc(service.Status().Nodes, func(n swo.NodeStatus) bool { return n.ID == self })
	})

	// status --json, the URLs from the service's environment; a flag wins
	// over a (here broken) variable.
	t.Setenv("SWOCTLTEST_DB_URL", "postgres://nobody:envpw@/")
	t.Setenv("SWOCTLTEST_DB_URL_NEXT", next.URL)
	r := swoctl(t, dbs, "status", "--env-prefix=SWOCTLTEST", "--db-url="+old.URL, "--json")
	if r.code != exitOK {
		t.Fatalf("status: exit %d", r.code)
	}
	var s swo.Status
	if err := json.Unmarshal([]byte(r.stdout), &s); err != nil {
		t.Fatalf("status --json does not parse as swo.Status: %v", err)
	}
	if s.Mode != swo.ModeSwitchover || s.Node.CanExec || !strings.HasPrefix(s.Node.Name, "swoctl-") || s.Next == nil {
		t.Errorf("status of the command's node: %+v", s)
	}
	var names []string
	for _, n := range s.Nodes {
		names = append(names, fmt.Sprintf("%s(exec=%v)", n.Name, n.CanExec))
	}
	if !slices.Contains(names, "web-1(exec=true)") || !slices.Contains(names, s.Node.Name+"(exec=false)") {
		t.Errorf("nodes: %v", names)
	}
	if r := swoctl(t, dbs, append([]string{"status"}, urls(old, next)...)...); r.code != exitOK || !strings.Contains(r.stdout, "web-1") {
		t.Errorf("status (text): exit %d", r.code)
	}

	// EXECUTE before any RESET is refused, changing nothing.
	if r := swoctl(t, dbs, append([]string{"execute"}, urls(old, next)...)...); r.code != exitNotReady || !strings.Contains(r.stderr, "RESET") {
		t.Fatalf("execute before reset: exit %d", r.code)
	}
	if r := swoctl(t, dbs, append([]string{"reset"}, urls(old, next)...)...); r.code != exitOK || !strings.Contains(r.stdout, "web-1") {
		t.Fatalf("reset: exit %d", r.code)
	}

	w := startWriter(db, next.Name)
	defer func() { close(w.stop); <-w.done }()
	r = swoctl(t, dbs, append([]string{"execute"}, urls(old, next)...)...)
	if r.code != exitOK || !strings.Contains(r.stdout, "switched: ") {
		t.Fatalf("execute: exit %d", r.code)
	}
	select {
	case <-w.done:
	case <-ctx.Done():
		t.Fatal("the service wrote nothing on the new database")
	}
	w.mu.Lock()
	onOld, onNext, errs := w.onOld, w.onNext, w.errs
	w.mu.Unlock()
	t.Logf("the service wrote %d rows on the old database, %d on the new, %d errors", len(onOld), len(onNext), len(errs))
	if len(errs) > 0 {
		t.Fatalf("the service saw errors: %v", errs)
	}
	var where string
	if err := db.QueryRowContext(ctx, "SELECT current_database()").Scan(&where); err != nil || where != next.Name {
		t.Fatalf("the service is on %q (%v), want the new database %s", where, err, next.Name)
	}
	var ids []int64
	rows, err := db.QueryContext(ctx, "SELECT id FROM events ORDER BY id")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	acked := slices.Sorted(slices.Values(append(slices.Clone(onOld), onNext...)))
	if !slices.Equal(ids, acked) {
		t.Fatalf("the new database holds %d events, the service was acknowledged %d", len(ids), len(acked))
	}

	// verify: the rows the service wrote on the new database differ...
	r = swoctl(t, dbs, append([]string{"verify"}, urls(old, next)...)...)
	if r.code != exitDifferences || !strings.Contains(r.stdout, "public.events") {
		t.Fatalf("verify after writes on the new database: exit %d", r.code)
	}
	// ... and nothing else.
	pgtest.Exec(t, next.URL, fmt.Sprintf("DELETE FROM events WHERE id >= %d", onNext[0]))
	if r := swoctl(t, dbs, append([]string{"verify"}, urls(old, next)...)...); r.code != exitOK {
		t.Fatalf("verify: exit %d", r.code)
	}
	r = swoctl(t, dbs, append([]string{"verify", "--json"}, urls(old, next)...)...)
	var rep swo.VerifyReport
	if err := json.Unmarshal([]byte(r.stdout), &rep); r.code != exitOK || err != nil || !rep.Equal || len(rep.Tables) != 2 {
		t.Fatalf("verify --json: exit %d, %v: %+v", r.code, err, rep)
	}

	// After the switch: RESET is refused as done; status says done.
	if r := swoctl(t, dbs, append([]string{"reset"}, urls(old, next)...)...); r.code != exitObsolete {
		t.Fatalf("reset after the switch: exit %d", r.code)
	}
	r = swoctl(t, dbs, append([]string{"status", "--json"}, urls(old, next)...)...)
	if err := json.Unmarshal([]byte(r.stdout), &s); r.code != exitOK || err != nil || s.State != swo.StateDone || s.Routing != swo.RoutingNext {
		t.Fatalf("status after the switch: exit %d, %v: %+v", r.code, err, s)
	}
	// The old database alone is obsolete.
	if r := swoctl(t, dbs, "status", "--db-url="+old.URL); r.code != exitObsolete {
		t.Fatalf("status of the old database alone: exit %d", r.code)
	}
}

// TestUsageAndConfigErrors: mistakes exit 1 before connecting, and an
// unusable URL is never echoed with its password; a wrong password is a
// connection failure (7), without the password either.
func TestUsageAndConfigErrors(t *testing.T) {
	const pw = "s3cr3tpw"
	bad := &pgtest.Database{Name: "bad", Password: pw}
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{}, exitUsage, "no command"},
		{[]string{"launch"}, exitUsage, "unknown command"},
		{[]string{"-h"}, exitOK, "Exit codes:"},
		{[]string{"status"}, exitUsage, "no --db-url"},
		{[]string{"status", "--env-prefix=SWOCTL_UNSET"}, exitUsage, "SWOCTL_UNSET_DB_URL is not set"},
		{[]string{"reset", "--db-url=postgres://app:" + pw + "@localhost/app"}, exitUsage, "--db-url-next"},
		{[]string{"reset", "--json", "--db-url=postgres://a@h/d", "--db-url-next=postgres://a@h/e"}, exitUsage, "--json"},
		{[]string{"status", "--db-url=postgres://app:" + pw + "@localhost:5432/"}, exitUsage, "no database name"},
		{[]string{"check", "--db-url=postgres://app:" + pw + "@localhost:5432/a", "--db-url-next=postgres://app:" + pw + "@local host:x/b"}, exitUsage, "--db-url-next"},
		{[]string{"status", "--db-url=postgres://app@localhost/app", "extra"}, exitUsage, "unexpected argument"},
		{[]string{"status", "--namespace=Bad-Name", "--db-url=postgres://app@localhost/app"}, exitUsage, "Namespace"},
		{[]string{"status", "--timeout=soon", "--db-url=postgres://app@localhost/app"}, exitUsage, "invalid value"},
	} {
		r := swoctl(t, []*pgtest.Database{bad}, tc.args...)
		if r.code != tc.code || !strings.Contains(r.stdout+r.stderr, tc.want) {
			t.Errorf("swoctl %q: exit %d, want %d with %q", tc.args, r.code, tc.code, tc.want)
		}
	}

	// A reachable server, a wrong password.
	old := pgtest.NewDatabase(t, pgtest.Owner("app"))
	wrong := strings.Replace(old.URL, old.Password, pw, 1)
	r := swoctl(t, []*pgtest.Database{old, bad}, "status", "--db-url="+wrong)
	if r.code != exitOtherFailure {
		t.Fatalf("wrong password: exit %d", r.code)
	}
}

// TestExitCodes: the mapping from the library's errors, most specific cause
// first, and the problems of a PreconditionError one per line.
func TestExitCodes(t *testing.T) {
	probs := &swo.PreconditionError{Problems: []swo.Problem{{Object: "public.a", Issue: "no primary key"}, {Object: "public.b.c", Issue: "column missing\nin the new database"}}}
	for _, tc := range []struct {
		err  error
		code int
		hint string
	}{
		{nil, exitOK, ""},
		{fmt.Errorf("swo: %w: Config.OldURL", swo.ErrConfig), exitUsage, ""},
		{fmt.Errorf("%w: no RESET yet", swo.ErrNotReady), exitNotReady, "RESET first"},
		{fmt.Errorf("%w: %w", swo.ErrResetFailed, probs), exitNotReady, "fix every problem"},
		{fmt.Errorf("%w: %w", swo.ErrRunFailed, probs), exitNotReady, "fix every problem"},
		{fmt.Errorf("%w: %w", swo.ErrResetFailed, swo.ErrTargetNotEmpty), exitNotReady, "fix every problem"},
		{fmt.Errorf("%w: node web-2 stopped answering", swo.ErrRunFailed), exitRunFailed, "RESET and EXECUTE again"},
		{fmt.Errorf("%w: take the execution lock", swo.ErrResetFailed), exitRunFailed, "RESET and EXECUTE again"},
		{fmt.Errorf("%w: %w: sessions 123", swo.ErrRunFailed, swo.ErrPauseBudget), exitPauseBudget, "pause budget"},
		{fmt.Errorf("%w: restart", swo.ErrDone), exitObsolete, "switch is done"},
		{fmt.Errorf("%w: db was switched over", swo.ErrObsolete), exitObsolete, "switched away"},
		{errors.New("connect: connection refused"), exitOtherFailure, ""},
		{context.DeadlineExceeded, exitOtherFailure, "run that started goes on"},
	} {
		var buf bytes.Buffer
		if code := fail(&buf, "execute", tc.err); tc.err != nil && (code != tc.code || !strings.Contains(buf.String(), tc.hint)) {
			t.Errorf("%v: exit %d, want %d; printed:\n%s", tc.err, code, tc.code, buf.String())
		}
		if code := exitCode(tc.err); code != tc.code {
			t.Errorf("exitCode(%v) = %d, want %d", tc.err, code, tc.code)
		}
	}
	var buf bytes.Buffer
	fail(&buf, "reset", fmt.Errorf("swo: %w: %w", swo.ErrResetFailed, probs))
	want := "swoctl reset: swo: reset failed: preconditions not met: 2 problem(s)\n" +
		"  - public.a: no primary key\n" +
		"  - public.b.c: column missing\n    in the new database\n"
	if !strings.HasPrefix(buf.String(), want) {
		t.Errorf("printed:\n%s\nwant it to start:\n%s", buf.String(), want)
	}
}
