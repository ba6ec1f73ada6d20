package swo

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgswo/swo/internal/pgtest"
)

// generation is the instances of a service started with one pair of URLs,
// each writing continuously through its *sql.DB.
type generation struct {
	nodes []*Connector
	dbs   []*sql.DB
	stop  chan struct{}
	wg    sync.WaitGroup
	mu    sync.Mutex
	acks  []chainAck
	errs  []error
}

// chainAck is an acknowledged write: its note and the database it reached.
type chainAck struct {
	body string
	db   string
	end  time.Time
}

func startGeneration(t *testing.T, name string, old, next *pgtest.Database, n int, mod func(*Config)) *generation {
	t.Helper()
	g := &generation{stop: make(chan struct{})}
	for i := 0; i < n; i++ {
		cfg := Config{OldURL: old.URL, NextURL: next.URL, NodeName: fmt.Sprintf("%s-%d", name, i), SyncWorkers: 2}
		if mod != nil {
			mod(&cfg)
		}
		c := newConnector(t, cfg)
		db := openDB(t, c)
		db.SetMaxOpenConns(4)
		g.nodes = append(g.nodes, c)
		g.dbs = append(g.dbs, db)
	}
	for i, db := range g.dbs {
		g.wg.Add(1)
		go g.write(db, fmt.Sprintf("%s-%d", name, i))
	}
	t.Cleanup(g.halt)
	return g
}

func (g *generation) write(db *sql.DB, who string) {
	defer g.wg.Done()
	for seq := 1; ; seq++ {
		select {
		case <-g.stop:
			return
		default:
		}
		a := chainAck{body: fmt.Sprintf("%s/%d", who, seq)}
		err := db.QueryRowContext(context.Background(),
			"INSERT INTO notes (body) VALUES ($1) RETURNING current_database(), clock_timestamp()", a.body).Scan(&a.db, &a.end)
		g.mu.Lock()
		if err != nil {
			g.errs = append(g.errs, fmt.Errorf("%s: %w", a.body, err))
		} else {
			g.acks = append(g.acks, a)
		}
		g.mu.Unlock()
		if err != nil {
			return
		}
	}
}

func (g *generation) halt() {
	select {
	case <-g.stop:
	default:
		close(g.stop)
	}
	g.wg.Wait()
}

// retire stops a generation as a rolling restart does: writers end, then
// the instances.
func (g *generation) retire() {
	g.halt()
	for i := range g.nodes {
		g.dbs[i].Close()
		g.nodes[i].Close()
	}
}

func switchGeneration(t *testing.T, g *generation) {
	t.Helper()
	ctx := testCtx(t)
	if err := g.nodes[0].Reset(ctx); err != nil {
		t.Fatal(err)
	}
	if err := g.nodes[len(g.nodes)-1].Execute(ctx); err != nil {
		t.Fatal(err)
	}
}

// switchedAt is when the database's switch committed (its log's "done").
func switchedAt(t *testing.T, d *pgtest.Database) time.Time {
	t.Helper()
	var at time.Time
	if err := pgtest.Connect(t, d.URL).QueryRow(testCtx(t), "SELECT at FROM swo.log WHERE kind = 'done'").Scan(&at); err != nil {
		t.Fatalf("%s: %v", d.Name, err)
	}
	return at
}

// TestChainedSwitchovers moves a service A → B → C → A′ (a fresh database)
// with instances writing throughout, restarted generation by generation.
// Instances still started with the first pair of URLs after A → B reach B
// holding B's connection lock: while they write, B → C cannot commit (it
// fails safely on its pause budget, naming them, rather than leave their
// writes behind in B); once they are gone it succeeds. Every acknowledged
// write is in the last database exactly once, and none reached a database
// after its switch.
func TestChainedSwitchovers(t *testing.T) {
	dbA, dbB, dbC, dbA2 := pgtest.NewDatabase(t), pgtest.NewDatabase(t), pgtest.NewDatabase(t), pgtest.NewDatabase(t)
	pgtest.Exec(t, dbA.URL, ledgerSchema+ledgerSeed)
	for _, d := range []*pgtest.Database{dbB, dbC, dbA2} {
		pgtest.Exec(t, d.URL, ledgerSchema)
	}
	ctx := testCtx(t)
	var all []*generation

	g1 := startGeneration(t, "g1", dbA, dbB, 2, nil)
	all = append(all, g1)
	switchGeneration(t, g1)

	// The next generation starts while the first still writes (to B).
	g2 := startGeneration(t, "g2", dbB, dbC, 2, func(cfg *Config) { cfg.PauseBudget = time.Second })
	all = append(all, g2)
	waitFor(t, func() bool {
		g1.mu.Lock()
		defer g1.mu.Unlock()
		n := 0
		for _, a := range g1.acks {
			if a.db == dbB.Name {
				n++
			}
		}
		return n > 20
	})
	if err := g2.nodes[0].Reset(ctx); err != nil {
		t.Fatal(err)
	}
	err := g2.nodes[1].Execute(ctx)
	if !errors.Is(err, ErrPauseBudget) || !strings.Contains(err.Error(), "swo:app:g1-") {
		t.Fatalf("B → C with the first generation still writing to B: %v", err)
	}
	g1.retire()
	switchGeneration(t, g2)

	g3 := startGeneration(t, "g3", dbC, dbA2, 2, nil)
	all = append(all, g3)
	g2.retire()
	switchGeneration(t, g3)
	waitFor(t, func() bool {
		g3.mu.Lock()
		defer g3.mu.Unlock()
		return len(g3.acks) > 0 && g3.acks[len(g3.acks)-1].db == dbA2.Name
	})
	g3.retire()

	// The first generation's URLs are obsolete twice over.
	if _, err := NewConnector(ctx, Config{OldURL: dbA.URL, NextURL: dbB.URL, Logger: testLogger(t)}); !errors.Is(err, ErrObsolete) {
		t.Fatalf("an instance started with A and B after B → C: %v", err)
	}

	switched := map[string]time.Time{dbA.Name: switchedAt(t, dbA), dbB.Name: switchedAt(t, dbB), dbC.Name: switchedAt(t, dbC)}
	want := map[string]int{}
	for _, g := range all {
		for _, err := range g.errs {
			t.Errorf("application error: %v", err)
		}
		for _, a := range g.acks {
			if at, ok := switched[a.db]; ok && !a.end.Before(at) {
				t.Errorf("write %s reached %s at %v, after its switch at %v", a.body, a.db, a.end, at)
			}
			want[a.body]++
		}
	}
	rows, err := pgtest.Connect(t, dbA2.URL).Query(ctx, "SELECT body, count(*) FROM notes WHERE body LIKE 'g%' GROUP BY body")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	for rows.Next() {
		var body string
		var n int
		if err := rows.Scan(&body, &n); err != nil {
			t.Fatal(err)
		}
		got[body] = n
	}
	for body := range want {
		if got[body] != 1 {
			t.Errorf("acknowledged write %s is in A′ %d times", body, got[body])
		}
	}
	for body, n := range got {
		if want[body] == 0 {
			t.Errorf("write %s is in A′ (%d times) but was never acknowledged", body, n)
		}
	}
	t.Logf("%d acknowledged writes across A → B → C → A′", len(want))
}
