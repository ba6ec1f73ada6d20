package swo

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pgswo/swo/internal/pgtest"
)

func TestMain(m *testing.M) {
	if os.Getenv(envChild) != "" {
		os.Exit(runChildNode()) // this process is a node of TestSeparateProcesses
	}
	pgtest.Main(m)
}

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

// logBuffer collects a connector's logs so tests can search them.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

func testLoggerTo(w io.Writer) *slog.Logger { return slog.New(slog.NewTextHandler(w, nil)) }

// testLogger keeps a test's logs and prints them only if the test fails.
func testLogger(t testing.TB) *slog.Logger {
	if os.Getenv("SWO_TEST_LOG") != "" { // see the logs as they happen
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	var buf logBuffer
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("logs:\n%s", buf.String())
		}
	})
	return slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// testTimings are shorter heartbeats, which keep the fault tests quick; the
// timeout still leaves room for a loaded CI machine.
var testTimings = timings{heartbeat: 250 * time.Millisecond, timeout: 3 * time.Second, poll: 250 * time.Millisecond, recheck: 5 * time.Second}

func newConnector(t testing.TB, cfg Config) *Connector {
	t.Helper()
	if cfg.timing == (timings{}) {
		cfg.timing = testTimings
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	c, err := NewConnector(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func openDB(t testing.TB, c *Connector) *sql.DB {
	db := sql.OpenDB(c)
	t.Cleanup(func() { db.Close() })
	return db
}

// dbName returns the name of the database a pooled query reaches.
func dbName(t testing.TB, db *sql.DB) string {
	t.Helper()
	var name string
	if err := db.QueryRowContext(testCtx(t), "SELECT current_database()").Scan(&name); err != nil {
		t.Fatal(err)
	}
	return name
}

// flip commits the switch the way the executor does, without moving data:
// every connector pauses and drains, the connection lock is taken exclusively,
// the old database is marked as switched to next, and the lock is released.
func flip(t testing.TB, old, next *pgtest.Database, connectors ...*Connector) {
	t.Helper()
	ctx := testCtx(t)
	for _, c := range connectors {
		c.router.pause(time.Now().Add(30 * time.Second))
	}
	keys := newLockKeys("swo")
	oc := pgtest.Connect(t, old.URL)
	if _, err := oc.Exec(ctx, "SET lock_timeout = '10s'"); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.Exec(ctx, "SELECT pg_advisory_lock($1, $2)", keys.space, lockConn); err != nil {
		t.Fatalf("exclusive connection lock not granted after the drain: %v", err)
	}
	var nextID string
	if err := pgtest.Connect(t, next.URL).QueryRow(ctx, "SELECT id FROM swo.meta").Scan(&nextID); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.Exec(ctx, "UPDATE swo.meta SET switched_to = $1, switched_at = now()", nextID); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.Exec(ctx, "NOTIFY swo"); err != nil {
		t.Fatal(err)
	}
	if _, err := oc.Exec(ctx, "SELECT pg_advisory_unlock($1, $2)", keys.space, lockConn); err != nil {
		t.Fatal(err)
	}
}

func TestNormalModeIsPassThrough(t *testing.T) {
	old := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NodeName: "n1"})
	db := openDB(t, c)
	if got := dbName(t, db); got != old.Name {
		t.Fatalf("query reached %s, want %s", got, old.Name)
	}
	// The connection handed out is pgx stdlib's own, so pgx features work.
	conn, err := db.Conn(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	err = conn.Raw(func(dc any) error {
		if _, ok := dc.(*stdlib.Conn); !ok {
			return fmt.Errorf("normal mode handed out %T, want *stdlib.Conn", dc)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var app string
	if err := conn.QueryRowContext(testCtx(t), "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()").Scan(&app); err != nil {
		t.Fatal(err)
	}
	if app != "swo:app-normal:n1" {
		t.Fatalf("application_name = %q, want swo:app-normal:n1", app)
	}
	// Normal mode creates nothing in the database.
	var hasSchema bool
	if err := db.QueryRowContext(testCtx(t), "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'swo')").Scan(&hasSchema); err != nil {
		t.Fatal(err)
	}
	if hasSchema {
		t.Fatal("normal mode created the swo schema")
	}
	if s := c.Status(); s.Mode != "normal" || s.Routing != "old" || s.Next != nil {
		t.Fatalf("status = %+v", s)
	}
}

func TestApplicationNameKeepsTheServicesOwn(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL + "&application_name=billing", NextURL: next.URL, NodeName: "n7"})
	db := openDB(t, c)
	var app string
	if err := db.QueryRowContext(testCtx(t), "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()").Scan(&app); err != nil {
		t.Fatal(err)
	}
	if app != "billing swo:app:n7" {
		t.Fatalf("application_name = %q", app)
	}
	// The control connection is visible under its own role.
	var n int
	if err := db.QueryRowContext(testCtx(t), "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'billing swo:ctl:n7'").Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != 1 {
		t.Fatalf("%d control connections visible, want 1", n)
	}
}

func TestSwitchoverModeRoutesToOldUntilTheFlip(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	db := openDB(t, c)
	for i := 0; i < 3; i++ {
		if got := dbName(t, db); got != old.Name {
			t.Fatalf("before the switch a query reached %s, want the old database %s", got, old.Name)
		}
	}
	s := c.Status()
	if s.Mode != "switchover" || s.Routing != "old" || !s.Node.ConfigValid || s.Old.ID == "" || s.Next == nil || s.Next.ID == "" || s.Old.ID == s.Next.ID {
		t.Fatalf("status = %+v", s)
	}
	flip(t, old, next, c)
	if got := dbName(t, db); got != next.Name {
		t.Fatalf("after the switch a query reached %s, want the next database %s", got, next.Name)
	}
	if s := c.Status(); s.Routing != "next" || s.Paused {
		t.Fatalf("status after switch = %+v", s)
	}
}

// TestFlipMovesEveryConnectorWithoutFailingAQuery runs several connectors with
// several pooled connections each, all writing, through a flip: no query may
// fail, and no write may reach the old database after the first write reached
// the new one.
func TestFlipMovesEveryConnectorWithoutFailingAQuery(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	for _, d := range []*pgtest.Database{old, next} {
		pgtest.Exec(t, d.URL, "CREATE TABLE w (node int, seq int, PRIMARY KEY (node, seq))")
	}
	const nodes, workers = 3, 4
	var conns []*Connector
	var dbs []*sql.DB
	for i := 0; i < nodes; i++ {
		c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: fmt.Sprintf("n%d", i)})
		db := openDB(t, c)
		db.SetMaxOpenConns(workers)
		conns = append(conns, c)
		dbs = append(dbs, db)
	}
	// Server-side times (both databases share the server's clock): when a
	// write's statement started, and when it had written its row.
	type write struct {
		db         string
		start, end time.Time
	}
	var (
		mu      sync.Mutex
		writes  []write
		failed  atomic.Int64
		stop    = make(chan struct{})
		wg      sync.WaitGroup
		reached = make(chan struct{}, nodes*workers)
	)
	for n := 0; n < nodes; n++ {
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func(n, w int) {
				defer wg.Done()
				for seq := w; ; seq += workers {
					select {
					case <-stop:
						return
					default:
					}
					var wr write
					err := dbs[n].QueryRowContext(context.Background(),
						"INSERT INTO w VALUES ($1, $2) RETURNING current_database(), statement_timestamp(), clock_timestamp()", n, seq).
						Scan(&wr.db, &wr.start, &wr.end)
					if err != nil {
						failed.Add(1)
						t.Errorf("node %d: write failed: %v", n, err)
						return
					}
					mu.Lock()
					writes = append(writes, wr)
					mu.Unlock()
					if wr.db == next.Name {
						select {
						case reached <- struct{}{}:
						default:
						}
					}
				}
			}(n, w)
		}
	}
	// Let every pool fill up and run, then flip under load.
	waitFor(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(writes) > 200 })
	flip(t, old, next, conns...)
	for i := 0; i < nodes*workers; i++ {
		select {
		case <-reached:
		case <-time.After(30 * time.Second):
			t.Fatal("writers did not reach the new database")
		}
	}
	close(stop)
	wg.Wait()
	if failed.Load() > 0 {
		t.Fatalf("%d writes failed", failed.Load())
	}
	var lastOld, firstNext time.Time
	var nOld, nNext int
	for _, w := range writes {
		if w.db == old.Name {
			nOld++
			if w.end.After(lastOld) {
				lastOld = w.end
			}
		} else {
			nNext++
			if firstNext.IsZero() || w.start.Before(firstNext) {
				firstNext = w.start
			}
		}
	}
	if !lastOld.Before(firstNext) {
		t.Fatalf("a write to the old database finished at %v, after a write to the new one started at %v", lastOld, firstNext)
	}
	t.Logf("%d writes to the old database, %d to the new; the last old one ended %v before the first new one started", nOld, nNext, firstNext.Sub(lastOld))
	// Every acknowledged write is where the writer was told it went.
	for _, d := range []*pgtest.Database{old, next} {
		var n int
		if err := pgtest.Connect(t, d.URL).QueryRow(testCtx(t), "SELECT count(*) FROM w").Scan(&n); err != nil {
			t.Fatal(err)
		}
		want := nOld
		if d == next {
			want = nNext
		}
		if n != want {
			t.Fatalf("%s holds %d rows, writers were told %d", d.Name, n, want)
		}
	}
	// Nothing of the applications is left on the old database.
	var left int
	if err := pgtest.Connect(t, old.URL).QueryRow(testCtx(t),
		"SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'swo:app:%'").Scan(&left); err != nil {
		t.Fatal(err)
	}
	if left != 0 {
		t.Fatalf("%d application connections still open on the old database", left)
	}
}

func waitFor(t testing.TB, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 30s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestObsoleteRefusedInBothModes(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	other := pgtest.NewDatabase(t)
	ctx := testCtx(t)

	normal := newConnector(t, Config{OldURL: old.URL})
	normalDB := openDB(t, normal)
	normalDB.SetMaxIdleConns(0) // every query connects, so Connect is exercised
	sw := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	swDB := openDB(t, sw)
	dbName(t, swDB)
	flip(t, old, next, sw)

	_, err := NewConnector(ctx, Config{OldURL: old.URL})
	if !errors.Is(err, ErrObsolete) {
		t.Fatalf("normal mode on the obsolete database: err = %v, want ErrObsolete", err)
	}
	if !strings.Contains(err.Error(), old.Name) || !strings.Contains(err.Error(), "--db-url") {
		t.Fatalf("error does not say which database and what to do: %v", err)
	}
	// A normal-mode connector started before the switch refuses new connections.
	if _, err := normalDB.ExecContext(ctx, "SELECT 1"); !errors.Is(err, ErrObsolete) {
		t.Fatalf("Connect on the obsolete database in normal mode: err = %v, want ErrObsolete", err)
	}
	// Switchover mode with the database it was switched to keeps working there.
	c2 := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	if got := dbName(t, openDB(t, c2)); got != next.Name {
		t.Fatalf("restarted switchover node reached %s, want %s", got, next.Name)
	}
	// Switchover mode towards another database is refused.
	if _, err := NewConnector(ctx, Config{OldURL: old.URL, NextURL: other.URL}); !errors.Is(err, ErrObsolete) {
		t.Fatalf("switchover mode from the obsolete database to a third one: err = %v, want ErrObsolete", err)
	}
	// The obsolete database named as the next one is refused.
	if _, err := NewConnector(ctx, Config{OldURL: other.URL, NextURL: old.URL}); !errors.Is(err, ErrObsolete) {
		t.Fatalf("obsolete database as --db-url-next: err = %v, want ErrObsolete", err)
	}
	// And the new database in normal mode is fine.
	newConnector(t, Config{OldURL: next.URL})
}

func TestTwoURLsOfOneDatabaseAreTheSameDatabase(t *testing.T) {
	d := pgtest.NewDatabase(t)
	other := strings.Replace(d.URL, "127.0.0.1", "localhost", 1)
	if other == d.URL {
		t.Fatal("test needs a 127.0.0.1 URL")
	}
	c := newConnector(t, Config{OldURL: d.URL, NextURL: other})
	s := c.Status()
	if s.Node.ConfigValid || !strings.Contains(s.Node.ConfigError, "same database") {
		t.Fatalf("config should be invalid (same database): %+v", s.Node)
	}
	if s.Old.ID != s.Next.ID {
		t.Fatalf("identities differ: %s vs %s", s.Old.ID, s.Next.ID)
	}
}

func TestRestoredCopyGetsItsOwnIdentity(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c1 := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	oldID := c1.Status().Old.ID
	// next now carries old's identity, as after restoring a dump of old.
	pgtest.Exec(t, next.URL, fmt.Sprintf("UPDATE swo.meta SET id = '%s'", oldID))
	c2 := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	s := c2.Status()
	if !s.Node.ConfigValid {
		t.Fatalf("config invalid: %s", s.Node.ConfigError)
	}
	if s.Next.ID == oldID || s.Old.ID != oldID {
		t.Fatalf("identities old=%s next=%s, want next renewed", s.Old.ID, s.Next.ID)
	}
}

func TestBadURLsRefusedWithoutPassword(t *testing.T) {
	const secret = "s3cr3t-P@ss"
	cases := []struct{ name, old, next string }{
		{"empty", "", ""},
		{"not a url", "postgres://me:" + secret + "@host:notaport/db", ""},
		{"bad sslmode", "postgres://me:" + secret + "@host/db?sslmode=bogus", ""},
		{"bad next", "postgres://me:" + secret + "@localhost/db", "postgres://me:" + secret + "@localhost:99999/db"},
		{"no database", "postgres://me:" + secret + "@localhost", ""},
		{"keyword form", "host=localhost password=" + secret + " port=abc dbname=x", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var logs logBuffer
			cfg := Config{OldURL: tc.old, NextURL: tc.next, Logger: slog.New(slog.NewTextHandler(&logs, nil))}
			err := cfg.Validate()
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("Validate: err = %v, want ErrConfig", err)
			}
			_, err2 := NewConnector(testCtx(t), cfg)
			if !errors.Is(err2, ErrConfig) {
				t.Fatalf("NewConnector: err = %v, want ErrConfig", err2)
			}
			for _, s := range []string{err.Error(), err2.Error(), logs.String()} {
				if strings.Contains(s, secret) || strings.Contains(s, "s3cr3t") {
					t.Fatalf("password leaked: %s", s)
				}
			}
			if !strings.Contains(err.Error(), "--db-url") {
				t.Fatalf("error does not name the setting: %v", err)
			}
		})
	}
}

func TestConnectionFailureDoesNotLeakPassword(t *testing.T) {
	d := pgtest.NewDatabase(t, pgtest.Owner("app"))
	wrong := strings.Replace(d.URL, d.Password, d.Password+"-wrong", 1)
	var logs logBuffer
	_, err := NewConnector(testCtx(t), Config{OldURL: wrong, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err == nil {
		t.Fatal("connected with a wrong password")
	}
	if strings.Contains(err.Error(), d.Password) || strings.Contains(logs.String(), d.Password) {
		t.Fatalf("password leaked: %v", err)
	}
	next := strings.Replace(d.URL, d.Name, "no_such_db", 1)
	c := newConnector(t, Config{OldURL: d.URL, NextURL: next, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	s := c.Status()
	js, _ := json.Marshal(s)
	if s.Node.ConfigValid || strings.Contains(string(js), d.Password) || strings.Contains(logs.String(), d.Password) {
		t.Fatalf("unreachable next database: config_valid=%v, status=%s", s.Node.ConfigValid, js)
	}
}

func TestFlagsAndEnvironment(t *testing.T) {
	t.Setenv("MYAPP_DB_URL", "postgres://u@envhost/a")
	t.Setenv("MYAPP_DB_URL_NEXT", "postgres://u@envhost/b")
	var cfg Config
	cfg.LoadEnv("MYAPP")
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	cfg.RegisterFlags(fs)
	if err := fs.Parse([]string{"--db-url-next=postgres://u@flaghost/c"}); err != nil {
		t.Fatal(err)
	}
	if cfg.OldURL != "postgres://u@envhost/a" || cfg.NextURL != "postgres://u@flaghost/c" {
		t.Fatalf("cfg = %+v: environment gives defaults, flags override", cfg)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	var cfg2 Config
	cfg2.LoadEnv("MYAPP_")
	if cfg2.NextURL != "postgres://u@envhost/b" {
		t.Fatalf("trailing underscore in prefix: %+v", cfg2)
	}
	bad := Config{OldURL: "postgres://u@h/a", Namespace: "Bad-Name"}
	if err := bad.Validate(); !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "Namespace") {
		t.Fatalf("bad namespace: %v", err)
	}
}

func TestStatusIsJSONWithStableNames(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "web-1", Version: "v1.2.3", APIOnly: true})
	b, err := json.Marshal(c.Status())
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"mode", "state", "routing", "paused", "node", "old", "next"} {
		if _, ok := m[k]; !ok {
			t.Fatalf("status JSON lacks %q: %s", k, b)
		}
	}
	node := m["node"].(map[string]any)
	if node["name"] != "web-1" || node["version"] != "v1.2.3" || node["can_exec"] != false || node["config_valid"] != true {
		t.Fatalf("node = %v", node)
	}
	if m["state"] != "unknown" {
		t.Fatalf("state = %v, want \"unknown\"", m["state"])
	}
	if strings.Contains(string(b), old.Password) {
		t.Fatal("status holds a password")
	}
}

func TestPauseMakesConnectWaitAndResumeReleasesIt(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	db := openDB(t, c)
	dbName(t, db) // one pooled connection
	c.router.pause(time.Now().Add(time.Minute))
	// The pooled connection was closed at once: its lock is free.
	oc := pgtest.Connect(t, old.URL)
	var got bool
	keys := newLockKeys("swo")
	if err := oc.QueryRow(testCtx(t), "SELECT pg_try_advisory_lock($1, $2)", keys.space, lockConn).Scan(&got); err != nil {
		t.Fatal(err)
	}
	if !got {
		t.Fatal("exclusive connection lock not free after the pause drained an idle pool")
	}
	if _, err := oc.Exec(testCtx(t), "SELECT pg_advisory_unlock($1, $2)", keys.space, lockConn); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := db.ExecContext(context.Background(), "SELECT 1")
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("query ran during the pause (err=%v)", err)
	case <-time.After(200 * time.Millisecond):
	}
	c.router.resume()
	if err := <-done; err != nil {
		t.Fatalf("query after resume: %v", err)
	}
	// A waiting Connect honours its context.
	c.router.pause(time.Now().Add(time.Minute))
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := db.ExecContext(ctx, "SELECT 1"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want deadline exceeded", err)
	}
	c.router.resume()
}

func TestPauseEndsByItselfAtItsDeadline(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	db := openDB(t, c)
	c.router.pause(time.Now().Add(150 * time.Millisecond))
	start := time.Now()
	if got := dbName(t, db); got != old.Name {
		t.Fatalf("reached %s", got)
	}
	if d := time.Since(start); d < 100*time.Millisecond {
		t.Fatalf("query did not wait for the pause (%v)", d)
	}
}

func TestBusyConnectionFinishesItsTransactionDuringThePause(t *testing.T) {
	old := pgtest.NewDatabase(t)
	next := pgtest.NewDatabase(t)
	pgtest.Exec(t, old.URL, "CREATE TABLE t (v int)")
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	db := openDB(t, c)
	ctx := testCtx(t)
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (1)"); err != nil {
		t.Fatal(err)
	}
	c.router.pause(time.Now().Add(time.Minute))
	// The transaction's connection is busy: it is not cut.
	if _, err := tx.ExecContext(ctx, "INSERT INTO t VALUES (2)"); err != nil {
		t.Fatalf("in-flight transaction broken by the pause: %v", err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	// Once returned, it is closed: nothing of the application holds the lock
	// (once its backend has exited, which happens after the close returns).
	oc := pgtest.Connect(t, old.URL)
	keys := newLockKeys("swo")
	waitFor(t, func() bool {
		var got bool
		err := oc.QueryRow(ctx, "SELECT pg_try_advisory_lock($1, $2)", keys.space, lockConn).Scan(&got)
		return err == nil && got
	})
	var n int
	if err := oc.QueryRow(ctx, "SELECT count(*) FROM t").Scan(&n); err != nil || n != 2 {
		t.Fatalf("rows = %d, %v", n, err)
	}
	c.router.resume()
}

func TestDriverOpenRefusesConnectionStrings(t *testing.T) {
	var c Connector
	c.drv = &Driver{c: &c}
	if _, err := c.Driver().Open("postgres://x"); err == nil || !strings.Contains(err.Error(), "sql.OpenDB") {
		t.Fatalf("err = %v", err)
	}
}
