package swo

import (
	"context"
	"testing"

	"github.com/pgswo/swo/internal/pgtest"
)

// TestIdleSyncSessionEndedByTheServer: the incremental sync's sessions are
// kept across its catch-ups; the server may end them while they are idle
// (a restart, an idle-connection reaper, a proxy reset) between the sync
// step's catch-up and the announcement's. The run reconnects and switches
// (found by review: it failed the run).
func TestIdleSyncSessionEndedByTheServer(t *testing.T) {
	old, next := fidelityPair(t, "CREATE TABLE t (id int PRIMARY KEY, v int);",
		"INSERT INTO t SELECT i, i FROM generate_series(1, 100) i;")
	c := newConnector(t, Config{OldURL: old.URL, NextURL: next.URL})
	atPhase(c, "incremental sync", func(ctx context.Context) {
		admin := pgtest.Connect(t, next.AdminURL())
		const syncSessions = "FROM pg_stat_activity WHERE datname = current_database() AND application_name ~ ':sync:'"
		pgtest.Exec(t, next.AdminURL(), "SELECT pg_terminate_backend(pid) "+syncSessions)
		waitFor(t, func() bool {
			var n int
			return admin.QueryRow(ctx, "SELECT count(*) "+syncSessions).Scan(&n) == nil && n == 0
		})
		pgtest.Exec(t, old.URL, "UPDATE t SET v = v + 1 WHERE id <= 10") // a write, captured
	})
	if err := switchover(t, c); err != nil {
		t.Fatalf("a new-database session ended while idle between two catch-ups failed the run: %v", err)
	}
	pgtest.AssertSame(t, old, next, pgtest.CompareOptions{})
}
