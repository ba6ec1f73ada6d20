package swo

import (
	"context"
	"database/sql"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/pgswo/swo/internal/pgtest"
)

// BenchmarkSteadyState measures the connector's cost in steady state against
// plain pgx stdlib on the same server and database. The variants run
// interleaved in small chunks, so machine noise hits them alike; the metrics
// normal/stdlib and switchover/stdlib are the ratios of their times per
// operation (1.00 = no overhead).
//
//	go test -run - -bench SteadyState -benchtime 20000x .
func BenchmarkSteadyState(b *testing.B) {
	old := pgtest.NewDatabase(b)
	next := pgtest.NewDatabase(b)
	pgtest.Exec(b, old.URL, "CREATE TABLE bench (id bigserial PRIMARY KEY, v int)")
	ctx := context.Background()

	cfg, err := pgx.ParseConfig(old.URL)
	if err != nil {
		b.Fatal(err)
	}
	plain := sql.OpenDB(stdlib.GetConnector(*cfg))
	defer plain.Close()
	normal := sql.OpenDB(newConnector(b, Config{OldURL: old.URL}))
	defer normal.Close()
	switchover := sql.OpenDB(newConnector(b, Config{OldURL: old.URL, NextURL: next.URL}))
	defer switchover.Close()
	variants := []*sql.DB{plain, normal, switchover}
	for _, db := range variants {
		db.SetMaxOpenConns(2)
		db.SetMaxIdleConns(2)
	}

	ops := []struct {
		name string
		fn   func(db *sql.DB) error
	}{
		{"select", func(db *sql.DB) error {
			var v int
			return db.QueryRowContext(ctx, "SELECT $1::int", 7).Scan(&v)
		}},
		{"write-tx", func(db *sql.DB) error {
			tx, err := db.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, "INSERT INTO bench (v) VALUES ($1)", 1); err != nil {
				_ = tx.Rollback()
				return err
			}
			return tx.Commit()
		}},
	}
	for _, op := range ops {
		b.Run(op.name, func(b *testing.B) {
			for _, db := range variants { // warm the pools and statement caches
				for i := 0; i < 50; i++ {
					if err := op.fn(db); err != nil {
						b.Fatal(err)
					}
				}
			}
			var spent [3]time.Duration
			const chunk = 50
			b.ResetTimer()
			for i := 0; i < b.N; i += chunk {
				n := min(chunk, b.N-i)
				for v, db := range variants {
					start := time.Now()
					for j := 0; j < n; j++ {
						if err := op.fn(db); err != nil {
							b.Fatal(err)
						}
					}
					spent[v] += time.Since(start)
				}
			}
			b.StopTimer()
			per := func(v int) float64 { return float64(spent[v].Nanoseconds()) / float64(b.N) }
			b.ReportMetric(per(0), "stdlib-ns/op")
			b.ReportMetric(per(1), "normal-ns/op")
			b.ReportMetric(per(2), "switchover-ns/op")
			b.ReportMetric(per(1)/per(0), "normal/stdlib")
			b.ReportMetric(per(2)/per(0), "switchover/stdlib")
		})
	}
}

// BenchmarkSteadyStatePool is BenchmarkSteadyState for the pgx front end: a
// plain pgxpool against pools from OpenPool in normal and in switchover
// mode, on the same server and database, interleaved in small chunks. The
// metrics normal/pgxpool and switchover/pgxpool are the ratios of their
// times per operation (1.00 = no overhead).
//
//	go test -run - -bench SteadyStatePool -benchtime 20000x .
func BenchmarkSteadyStatePool(b *testing.B) {
	old := pgtest.NewDatabase(b)
	next := pgtest.NewDatabase(b)
	pgtest.Exec(b, old.URL, "CREATE TABLE bench (id bigserial PRIMARY KEY, v int)")
	ctx := context.Background()

	size := func(pc *pgxpool.Config) { pc.MaxConns = 2 }
	cfg, err := pgxpool.ParseConfig(old.URL)
	if err != nil {
		b.Fatal(err)
	}
	size(cfg)
	plain, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer plain.Close()
	normal := openPool(b, newConnector(b, Config{OldURL: old.URL}), size)
	switchover := openPool(b, newConnector(b, Config{OldURL: old.URL, NextURL: next.URL}), size)
	variants := []*pgxpool.Pool{plain, normal, switchover}

	ops := []struct {
		name string
		fn   func(p *pgxpool.Pool) error
	}{
		{"select", func(p *pgxpool.Pool) error {
			var v int
			return p.QueryRow(ctx, "SELECT $1::int", 7).Scan(&v)
		}},
		{"write-tx", func(p *pgxpool.Pool) error {
			tx, err := p.Begin(ctx)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "INSERT INTO bench (v) VALUES ($1)", 1); err != nil {
				_ = tx.Rollback(ctx)
				return err
			}
			return tx.Commit(ctx)
		}},
	}
	for _, op := range ops {
		b.Run(op.name, func(b *testing.B) {
			for _, p := range variants { // warm the pools and statement caches
				for i := 0; i < 50; i++ {
					if err := op.fn(p); err != nil {
						b.Fatal(err)
					}
				}
			}
			var spent [3]time.Duration
			const chunk = 50
			b.ResetTimer()
			for i := 0; i < b.N; i += chunk {
				n := min(chunk, b.N-i)
				for v, p := range variants {
					start := time.Now()
					for j := 0; j < n; j++ {
						if err := op.fn(p); err != nil {
							b.Fatal(err)
						}
					}
					spent[v] += time.Since(start)
				}
			}
			b.StopTimer()
			per := func(v int) float64 { return float64(spent[v].Nanoseconds()) / float64(b.N) }
			b.ReportMetric(per(0), "pgxpool-ns/op")
			b.ReportMetric(per(1), "normal-ns/op")
			b.ReportMetric(per(2), "switchover-ns/op")
			b.ReportMetric(per(1)/per(0), "normal/pgxpool")
			b.ReportMetric(per(2)/per(0), "switchover/pgxpool")
		})
	}
}

// BenchmarkPause measures what the application feels of a switch: 16
// writers through one node's *sql.DB run single-row write transactions in
// steady state, then through RESET + EXECUTE. It reports the latency
// percentiles of both periods, the worst latency during EXECUTE minus the
// worst in steady state, the pause as the leader measured it, EXECUTE's
// duration to live, and the errors the application saw (must be 0).
//
//	go test -run - -bench Pause -benchtime 1x -count 3 .
func BenchmarkPause(b *testing.B) {
	for i := 0; i < b.N; i++ {
		old := pgtest.NewDatabase(b)
		next := pgtest.NewDatabase(b)
		pgtest.Exec(b, old.URL, ledgerSchema+ledgerSeed+"INSERT INTO notes (body) SELECT repeat('x', 200) FROM generate_series(1, 100000);")
		pgtest.Exec(b, next.URL, ledgerSchema)
		c := newConnector(b, Config{OldURL: old.URL, NextURL: next.URL, NodeName: "bench", SyncWorkers: 2})
		db := openDB(b, c)
		db.SetMaxOpenConns(16)
		db.SetMaxIdleConns(16)
		ctx := context.Background()

		type sample struct {
			at  time.Time
			lat time.Duration
		}
		var mu sync.Mutex
		var samples []sample
		var errs atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for w := 0; w < 16; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				for seq := 1; ; seq++ {
					select {
					case <-stop:
						return
					default:
					}
					start := time.Now()
					err := func() error {
						tx, err := db.BeginTx(ctx, nil)
						if err != nil {
							return err
						}
						defer tx.Rollback() //nolint:errcheck
						if _, err := tx.ExecContext(ctx, "INSERT INTO ledger (node, worker, seq, counter) VALUES (0, $1, $2, $3)", w, seq, seq%100); err != nil {
							return err
						}
						if _, err := tx.ExecContext(ctx, "UPDATE counters SET n = n + 1 WHERE id = $1", seq%100); err != nil {
							return err
						}
						return tx.Commit()
					}()
					if err != nil {
						errs.Add(1)
						b.Errorf("application error: %v", err)
						continue
					}
					mu.Lock()
					samples = append(samples, sample{start, time.Since(start)})
					mu.Unlock()
				}
			}(w)
		}
		time.Sleep(3 * time.Second) // steady state
		steadyEnd := time.Now()
		if err := c.Reset(ctx); err != nil {
			b.Fatal(err)
		}
		execStart := time.Now()
		if err := c.Execute(ctx); err != nil {
			b.Fatal(err)
		}
		execDur := time.Since(execStart)
		time.Sleep(time.Second)
		close(stop)
		wg.Wait()
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		var steady, during, window, syncing []time.Duration
		st := c.Status().Timings
		for _, s := range samples {
			switch {
			case s.at.Before(steadyEnd):
				steady = append(steady, s.lat)
			case !s.at.Before(execStart) && s.at.Before(execStart.Add(execDur)):
				during = append(during, s.lat)
			}
			if st.PauseAt != nil && !s.at.Before(execStart) && s.at.Add(s.lat).Before(*st.PauseAt) {
				syncing = append(syncing, s.lat)
			}
			// Transactions that overlapped the stop-the-world window.
			if st.PauseAt != nil && st.DoneAt != nil && s.at.Before(*st.DoneAt) && s.at.Add(s.lat).After(*st.PauseAt) {
				window = append(window, s.lat)
			}
		}
		b.ReportMetric(ms(percentiles(window)[2]), "pause-window-max-ms")
		b.ReportMetric(ms(percentiles(syncing)[2]), "sync-phase-max-ms")
		b.ReportMetric(ms(percentiles(window)[2]-percentiles(steady)[2]), "pause-window-extra-ms")
		ps, pd := percentiles(steady), percentiles(during)
		b.ReportMetric(ms(ps[0]), "steady-p50-ms")
		b.ReportMetric(ms(ps[1]), "steady-p99-ms")
		b.ReportMetric(ms(ps[2]), "steady-max-ms")
		b.ReportMetric(ms(pd[0]), "execute-p50-ms")
		b.ReportMetric(ms(pd[1]), "execute-p99-ms")
		b.ReportMetric(ms(pd[2]), "execute-max-ms")
		b.ReportMetric(ms(pd[2]-ps[2]), "worst-extra-ms")
		b.ReportMetric(float64(c.Status().Timings.PauseMS), "pause-ms")
		b.ReportMetric(execDur.Seconds(), "execute-to-live-s")
		b.ReportMetric(float64(errs.Load()), "app-errors")
	}
}

// percentiles returns p50, p99 and max.
func percentiles(d []time.Duration) [3]time.Duration {
	if len(d) == 0 {
		return [3]time.Duration{}
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return [3]time.Duration{s[len(s)/2], s[len(s)*99/100], s[len(s)-1]}
}
