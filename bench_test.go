package swo

import (
	"context"
	"database/sql"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
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
