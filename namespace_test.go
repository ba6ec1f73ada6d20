package swo

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/pgswo/swo/internal/pgtest"
)

// TestNamespacesStayApart runs a switchover in namespace "a_b" while another
// deployment, namespace "axb", keeps an idle connection on the same old
// database: "_" must not match "x" (it did with LIKE), or that session counts
// as a stray without the lock and the switch is refused.
func TestNamespacesStayApart(t *testing.T) {
	old, next := pgtest.NewDatabase(t), pgtest.NewDatabase(t)
	pgtest.Exec(t, old.URL, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
	pgtest.Exec(t, next.URL, "CREATE TABLE t (id int PRIMARY KEY)")
	other := openDB(t, newConnector(t, Config{OldURL: old.URL, Namespace: "axb", NodeName: "other"}))
	other.SetMaxIdleConns(1)
	if got := dbName(t, other); got != old.Name {
		t.Fatalf("other deployment on %s", got)
	}
	// Its idle session must be older than the stray check's one second.
	pgtest.Exec(t, old.URL, "SELECT pg_sleep(1.1)")
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, Namespace: "a_b", NodeName: "n"})
	ctx := testCtx(t)
	if err := c.Reset(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Execute(ctx); err != nil {
		t.Fatalf("EXECUTE with another namespace's session on the old database: %v", err)
	}
	if got := dbName(t, other); got != old.Name {
		t.Fatalf("the other deployment moved to %s", got)
	}
}

// TestApplicationNameKeepsTheMarker gives the service a long
// application_name and a long node name: the marker the library finds its
// sessions by survives PostgreSQL's 63 bytes.
func TestApplicationNameKeepsTheMarker(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("b", 60)
	for _, tc := range []struct{ base, node string }{{long, "web-1"}, {"", strings.Repeat("n", 80)}, {long, strings.Repeat("n", 80)}} {
		p, err := Config{OldURL: "postgres://u@h/db?application_name=" + tc.base, NodeName: tc.node}.withDefaults().parse()
		if err != nil {
			t.Fatal(err)
		}
		s := &common{cfg: Config{Namespace: "swo", NodeName: tc.node}}
		name := s.appName(p.old, roleApp)
		if len(name) > 63 {
			t.Errorf("%q is %d bytes", name, len(name))
		}
		if !strings.HasPrefix(name, "swo:app:") && !strings.Contains(name, " swo:app:") {
			t.Errorf("base %d bytes, node %d bytes: marker lost in %q", len(tc.base), len(tc.node), name)
		}
	}
}

// TestNodesStartingTogetherOnARestoredCopyAgree starts several nodes at once
// against a next database restored from a copy of the old one: they must
// agree on the one new identity it gets (each used to write its own), and
// EXECUTE must then work.
func TestNodesStartingTogetherOnARestoredCopyAgree(t *testing.T) {
	old, next := pgtest.NewDatabase(t), pgtest.NewDatabase(t)
	pgtest.Exec(t, old.URL, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
	pgtest.Exec(t, next.URL, "CREATE TABLE t (id int PRIMARY KEY)")
	first := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "first"})
	oldID := first.Status().Old.ID
	first.Close()
	pgtest.Exec(t, next.URL, fmt.Sprintf("UPDATE swo.meta SET id = '%s'", oldID))
	const n = 4
	nodes := make([]*Connector, n)
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := NewConnector(testCtx(t), Config{OldURL: old.URL, NextURL: next.URL, NodeName: fmt.Sprintf("n%d", i),
				Logger: testLogger(t), timing: testTimings})
			if err != nil {
				errs <- err
				return
			}
			t.Cleanup(func() { c.Close() })
			nodes[i] = c
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	var stored string
	if err := pgtest.Connect(t, next.URL).QueryRow(testCtx(t), "SELECT id::text FROM swo.meta").Scan(&stored); err != nil {
		t.Fatal(err)
	}
	for _, c := range nodes {
		if s := c.Status(); s.Next.ID != stored || s.Next.ID == oldID {
			t.Fatalf("node %s sees the next database as %s; it holds %s (old %s)", s.Node.Name, s.Next.ID, stored, oldID)
		}
	}
	waitFor(t, func() bool {
		s := nodes[0].Status()
		return len(s.Nodes) == n && !slices.ContainsFunc(s.Nodes, func(ns NodeStatus) bool { return !ns.ConfigValid })
	})
	ctx := testCtx(t)
	if err := nodes[0].Reset(ctx); err != nil {
		t.Fatal(err)
	}
	if err := nodes[1].Execute(ctx); err != nil {
		t.Fatal(err)
	}
}
