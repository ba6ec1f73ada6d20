package swo

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgswo/swo/internal/pgtest"
	"github.com/pgswo/swo/internal/replicate"
)

// benchSchema is three related tables with keys, a unique constraint,
// secondary indexes and foreign keys, as a real service has.
const benchSchema = `
CREATE TABLE customers (id bigint PRIMARY KEY, email text NOT NULL UNIQUE, name text, created timestamptz NOT NULL);
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers, status text NOT NULL,
	total numeric(12, 2), created timestamptz NOT NULL);
CREATE INDEX orders_customer ON orders (customer_id);
CREATE INDEX orders_created ON orders (created);
CREATE TABLE items (order_id bigint REFERENCES orders, line int, sku text NOT NULL, qty int NOT NULL,
	price numeric(10, 2), PRIMARY KEY (order_id, line));
CREATE INDEX items_sku ON items (sku);`

// benchData fills the tables: n customers, 4n orders, 10n items (15n rows).
func benchData(n int) string {
	return fmt.Sprintf(`
INSERT INTO customers SELECT i, 'c' || i || '@example.com', 'Customer ' || i, '2024-01-01'::timestamptz + i * interval '1 minute' FROM generate_series(1, %[1]d) i;
INSERT INTO orders SELECT i, 1 + i %% %[1]d, (ARRAY['new','paid','shipped'])[1 + i %% 3], (i %% 1000) / 7.0, '2024-01-01'::timestamptz + i * interval '1 second' FROM generate_series(1, %[1]d * 4) i;
INSERT INTO items SELECT 1 + i / 3 %% (%[1]d * 4), i %% 3, 'SKU-' || (i %% 5000), 1 + i %% 9, (i %% 500) / 3.0 FROM generate_series(0, %[1]d * 10 - 1) i;
ANALYZE;`, n)
}

// rawPipe is the baseline: a serial COPY TO STDOUT | COPY FROM STDIN of each
// table, in foreign key order, through pgconn, into a fully indexed target.
func rawPipe(ctx context.Context, srcURL, dstURL string) error {
	src, err := pgconn.Connect(ctx, srcURL)
	if err != nil {
		return err
	}
	defer src.Close(context.Background())
	dst, err := pgconn.Connect(ctx, dstURL)
	if err != nil {
		return err
	}
	defer dst.Close(context.Background())
	for _, t := range []string{"customers", "orders", "items"} {
		pr, pw := io.Pipe()
		errc := make(chan error, 1)
		go func() {
			_, err := src.CopyTo(ctx, pw, "COPY "+t+" TO STDOUT")
			pw.CloseWithError(err)
			errc <- err
		}()
		if _, err := dst.CopyFrom(ctx, pr, "COPY "+t+" FROM STDIN"); err != nil {
			return err
		}
		if err := <-errc; err != nil {
			return err
		}
	}
	return nil
}

// fullSync is a whole data sync run, from the checks to the validated target.
func fullSync(ctx context.Context, c *Connector) error {
	r, err := c.check(ctx)
	if err != nil {
		return err
	}
	for _, step := range []func(context.Context) error{r.checkTarget, r.startCapture, r.prepare, r.initialCopy, r.catchUp} {
		if err := step(ctx); err != nil {
			return err
		}
	}
	src, err := replicate.Connect(ctx, r.eng.Src)
	if err != nil {
		return err
	}
	defer src.Close(context.Background())
	dst, err := replicate.Connect(ctx, r.eng.Dst)
	if err != nil {
		return err
	}
	defer dst.Close(context.Background())
	tx, err := src.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := r.final(ctx, tx, dst); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return err
	}
	return r.eng.Finish(ctx)
}

// peakHeap samples the Go heap while fn runs.
func peakHeap(fn func() error) (uint64, error) {
	runtime.GC()
	var peak atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	err := fn()
	close(stop)
	wg.Wait()
	return peak.Load(), err
}

// BenchmarkInitialCopy compares a whole swo data sync (capture, parallel
// load into bare tables, index rebuild, final sync, foreign key validation)
// with the raw serial pipe into the indexed target, side by side on the same
// server and source data: 1.5M rows in three related tables (n=100000).
//
//	go test -run - -bench InitialCopy -benchtime 1x -count 3 .
func BenchmarkInitialCopy(b *testing.B) {
	for _, n := range []int{20000, 100000} {
		b.Run(fmt.Sprintf("rows=%d", 15*n), func(b *testing.B) {
			ctx := context.Background()
			srv := pgtest.Shared(b)
			src := srv.NewDatabase(b)
			pgtest.Exec(b, src.URL, benchSchema+benchData(n))
			var pipeTime, swoTime time.Duration
			var pipeHeap, swoHeap uint64
			for i := 0; i < b.N; i++ {
				dstPipe := srv.NewDatabase(b)
				dstSwo := srv.NewDatabase(b)
				pgtest.Exec(b, dstPipe.URL, benchSchema)
				pgtest.Exec(b, dstSwo.URL, benchSchema)
				pgtest.Exec(b, src.URL, "CHECKPOINT")
				start := time.Now()
				h, err := peakHeap(func() error { return rawPipe(ctx, src.URL, dstPipe.URL) })
				if err != nil {
					b.Fatal(err)
				}
				pipeTime += time.Since(start)
				pipeHeap = max(pipeHeap, h)

				c, err := NewConnector(ctx, Config{OldURL: src.URL, NextURL: dstSwo.URL, Logger: testLogger(b), SyncWorkers: 2})
				if err != nil {
					b.Fatal(err)
				}
				pgtest.Exec(b, src.URL, "CHECKPOINT")
				start = time.Now()
				h, err = peakHeap(func() error { return fullSync(ctx, c) })
				if err != nil {
					b.Fatal(err)
				}
				swoTime += time.Since(start)
				swoHeap = max(swoHeap, h)
				if err := c.cleanupCaptureForBench(ctx); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
			b.ReportMetric(pipeTime.Seconds()/float64(b.N), "pipe-s")
			b.ReportMetric(swoTime.Seconds()/float64(b.N), "swo-s")
			b.ReportMetric(swoTime.Seconds()/pipeTime.Seconds(), "swo/pipe")
			b.ReportMetric(float64(swoHeap)/(1<<20), "swo-peak-heap-MiB")
			b.ReportMetric(float64(pipeHeap)/(1<<20), "pipe-peak-heap-MiB")
		})
	}
}

// cleanupCaptureForBench removes capture from the old database between
// iterations (the target stays: it is dropped with the test database).
func (c *Connector) cleanupCaptureForBench(ctx context.Context) error {
	cfg, err := c.config(ctx, c.old, roleSync)
	if err != nil {
		return err
	}
	src, err := replicate.Connect(ctx, cfg)
	if err != nil {
		return err
	}
	defer src.Close(context.Background())
	_, err = src.Exec(ctx, "DROP SCHEMA swo CASCADE")
	return err
}

var writerIDs atomic.Int64

// writer runs single-row write transactions (an insert and an update) on
// pool until stop, and returns the count.
func writer(ctx context.Context, pool *pgxpool.Pool, workers int, d time.Duration) int64 {
	var n atomic.Int64
	next := &writerIDs
	next.CompareAndSwap(0, 1<<40)
	deadline := time.Now().Add(d)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				id := next.Add(1)
				err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
					if _, err := tx.Exec(ctx, "INSERT INTO orders VALUES ($1, 1, 'new', 1, now())", id); err != nil {
						return err
					}
					_, err := tx.Exec(ctx, "UPDATE customers SET name = 'x' || $1::bigint WHERE id = 1 + $1::bigint % 1000", id)
					return err
				})
				if err != nil {
					panic(err)
				}
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	return n.Load()
}

// BenchmarkCapture measures (1) the source's write throughput with change
// capture on versus off, interleaved, and (2) the incremental sync's apply
// rate versus the rate at which a busy writer produced the changes.
//
//	go test -run - -bench Capture -benchtime 1x .
func BenchmarkCapture(b *testing.B) {
	ctx := context.Background()
	srv := pgtest.Shared(b)
	src := srv.NewDatabase(b)
	dst := srv.NewDatabase(b)
	pgtest.Exec(b, src.URL, benchSchema+benchData(2000))
	pgtest.Exec(b, dst.URL, benchSchema)
	c, err := NewConnector(ctx, Config{OldURL: src.URL, NextURL: dst.URL, Logger: testLogger(b), SyncWorkers: 2})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	pool, err := pgxpool.New(ctx, src.URL)
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	const workers, slice = 8, 3 * time.Second

	r, err := c.check(ctx)
	if err != nil {
		b.Fatal(err)
	}
	for _, step := range []func(context.Context) error{r.checkTarget, r.startCapture, r.prepare, r.initialCopy} {
		if err := step(ctx); err != nil {
			b.Fatal(err)
		}
	}
	setCapture := func(on bool) {
		if on {
			if err := r.startCapture(ctx); err != nil {
				b.Fatal(err)
			}
			return
		}
		conn, err := replicate.Connect(ctx, r.eng.Src)
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, `DROP TRIGGER swo_capture ON customers; DROP TRIGGER swo_capture ON orders; DROP TRIGGER swo_capture ON items`); err != nil {
			b.Fatal(err)
		}
	}
	var off, on, applied, produced int64
	var applyTime time.Duration
	const rounds = 3
	for i := 0; i < rounds; i++ {
		setCapture(false)
		off += writer(ctx, pool, workers, slice)
		setCapture(true)
		on += writer(ctx, pool, workers, slice)
		// Apply what the busy writer produced, and time it.
		src2, err := replicate.Connect(ctx, r.eng.Src)
		if err != nil {
			b.Fatal(err)
		}
		dst2, err := replicate.Connect(ctx, r.eng.Dst)
		if err != nil {
			b.Fatal(err)
		}
		backlog, err := r.eng.Backlog(ctx, src2)
		if err != nil {
			b.Fatal(err)
		}
		produced += backlog
		start := time.Now()
		for {
			res, err := r.eng.Round(ctx, src2, dst2, 20000)
			if err != nil {
				b.Fatal(err)
			}
			applied += int64(res.Changes)
			if res.Changes == 0 {
				break
			}
		}
		applyTime += time.Since(start)
		src2.Close(ctx)
		dst2.Close(ctx)
	}
	writerRate := float64(produced) / (rounds * slice.Seconds())
	applyRate := float64(applied) / applyTime.Seconds()
	b.ReportMetric(float64(off)/(rounds*slice.Seconds()), "tx/s-capture-off")
	b.ReportMetric(float64(on)/(rounds*slice.Seconds()), "tx/s-capture-on")
	b.ReportMetric(float64(on)/float64(off), "on/off")
	b.ReportMetric(writerRate, "writer-changes/s")
	b.ReportMetric(applyRate, "apply-changes/s")
	b.ReportMetric(applyRate/writerRate, "apply/writer")
}

// BenchmarkSwitchoverVsPgcopydb compares a whole switchover of an idle
// database (RESET and EXECUTE, one node: checks, capture, copy, indexes,
// final sync, commit, foreign keys validated) with pgcopydb, the dedicated
// copy tool, cloning the same data (`pgcopydb clone --table-jobs 2
// --index-jobs 2`: schema, data, indexes, constraints) into an empty
// database, side by side on one server. Two identical source databases are
// used, each copied once, so neither run warms the other's data. Needs
// pgcopydb (Debian package pgcopydb) and pg_dump on PATH or in the server's
// binary directory.
//
//	go test -run - -bench SwitchoverVsPgcopydb -benchtime 1x -count 2 .
//	SWO_BENCH_CUSTOMERS=400000 go test -run - -bench SwitchoverVsPgcopydb -benchtime 1x .   # 6 M rows
func BenchmarkSwitchoverVsPgcopydb(b *testing.B) {
	// swo-s ends when the new database's foreign keys are validated (after
	// the switch, in the background); swo-switched-s when Execute returns
	// (the service is on the new database).
	pgcopydb, err := exec.LookPath("pgcopydb")
	if err != nil {
		b.Fatal("pgcopydb not found: apt-get install pgcopydb")
	}
	n := 100000 // customers; 15n rows in all
	if v := os.Getenv("SWO_BENCH_CUSTOMERS"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil {
			b.Fatalf("SWO_BENCH_CUSTOMERS: %v", err)
		}
	}
	b.Run(fmt.Sprintf("rows=%d", 15*n), func(b *testing.B) {
		ctx := context.Background()
		srv := pgtest.Shared(b)
		var toolTime, swoTime, switchTime time.Duration
		for i := 0; i < b.N; i++ {
			srcTool, srcSwo := srv.NewDatabase(b), srv.NewDatabase(b)
			pgtest.Exec(b, srcTool.URL, benchSchema+benchData(n))
			pgtest.Exec(b, srcSwo.URL, benchSchema+benchData(n))
			dstTool, dstSwo := srv.NewDatabase(b), srv.NewDatabase(b)
			pgtest.Exec(b, dstSwo.URL, benchSchema) // the service's migrations
			pgtest.Exec(b, srcTool.URL, "CHECKPOINT")

			runTool := func() {
				pgtest.Exec(b, srcTool.URL, "CHECKPOINT")
				cmd := exec.CommandContext(ctx, pgcopydb, "clone", "--source", srcTool.URL, "--target", dstTool.URL,
					"--table-jobs", "2", "--index-jobs", "2", "--dir", b.TempDir(), "--no-owner", "--no-acl")
				cmd.Env = append(os.Environ(), "PATH="+pgBinDir(b)+":"+os.Getenv("PATH"))
				start := time.Now()
				if out, err := cmd.CombinedOutput(); err != nil {
					b.Fatalf("pgcopydb: %v\n%s", err, out)
				}
				toolTime += time.Since(start)
			}
			runSwo := func() {
				// The library's defaults: 4 workers, which copy units and
				// build indexes (pgcopydb runs 2 table jobs and 2 index jobs).
				c, err := NewConnector(ctx, Config{OldURL: srcSwo.URL, NextURL: dstSwo.URL, Logger: testLogger(b)})
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				pgtest.Exec(b, srcSwo.URL, "CHECKPOINT")
				start := time.Now()
				if err := c.Reset(ctx); err != nil {
					b.Fatal(err)
				}
				if err := c.Execute(ctx); err != nil {
					b.Fatal(err)
				}
				switchTime += time.Since(start)
				waitFor(b, func() bool { return c.leader.progress() == nil }) // foreign keys validated
				swoTime += time.Since(start)
			}
			// Alternate which runs first: the second may find a warmer
			// or a busier (checkpointing) server.
			if pgcopydbRuns.Add(1)%2 == 1 {
				runTool()
				runSwo()
			} else {
				runSwo()
				runTool()
			}
		}
		b.ReportMetric(toolTime.Seconds()/float64(b.N), "pgcopydb-s")
		b.ReportMetric(swoTime.Seconds()/float64(b.N), "swo-s")
		b.ReportMetric(switchTime.Seconds()/float64(b.N), "swo-switched-s")
		b.ReportMetric(swoTime.Seconds()/toolTime.Seconds(), "swo/pgcopydb")
		b.ReportMetric(switchTime.Seconds()/toolTime.Seconds(), "switched/pgcopydb")
	})
}

var pgcopydbRuns atomic.Int64

// pgBinDir is the directory of the PostgreSQL binaries (pg_dump, pg_restore)
// matching the test server.
func pgBinDir(tb testing.TB) string {
	if d := os.Getenv(pgtest.EnvBinDir); d != "" {
		return d
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		return strings.TrimSpace(string(out))
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	if len(dirs) == 0 {
		tb.Fatal("no PostgreSQL binaries for pg_dump")
	}
	return dirs[len(dirs)-1]
}
