// Command demo runs a whole switchover on a fresh machine: it starts two
// throwaway PostgreSQL servers through the test harness (local binaries or
// Docker), runs a service of three instances writing continuously through
// swo connectors, and performs the operator's flow: RESET, EXECUTE,
// verification, and the restart on the new database.
//
//	go run ./examples/demo
package main

import (
	"context"
	"database/sql"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pgswo/swo"
	"github.com/pgswo/swo/examples/internal/progressview"
	"github.com/pgswo/swo/internal/pgtest"
)

const schema = `
CREATE TYPE status AS ENUM ('new', 'paid', 'shipped');
CREATE TABLE customers (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email text NOT NULL UNIQUE);
CREATE TABLE orders (
	id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	customer_id bigint NOT NULL REFERENCES customers ON DELETE CASCADE,
	status status NOT NULL DEFAULT 'new',
	total numeric(12, 2) NOT NULL,
	created timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_customer ON orders (customer_id);`

func main() {
	rows := flag.Int("rows", 200000, "orders in the old database before the switch")
	verbose := flag.Bool("v", false, "show the library's logs")
	flag.Parse()
	if err := run(*rows, *verbose); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(rows int, verbose bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	level := slog.LevelWarn
	if verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	step("starting two throwaway PostgreSQL servers")
	var dbs [2]*pgtest.Database
	for i, label := range []string{"old", "new"} {
		srv, err := pgtest.Start(ctx, true)
		if err != nil {
			return err
		}
		defer srv.Close()
		// The service's role owns its tables and is no superuser, as on a managed database.
		if dbs[i], err = srv.CreateDatabase(ctx, pgtest.Owner("app")); err != nil {
			return err
		}
		fmt.Printf("  %s database: %s (%s backend)\n", label, srv.Addr(), srv.Backend())
	}
	oldURL, newURL := dbs[0].URL, dbs[1].URL
	if err := exec(ctx, oldURL, schema+fmt.Sprintf(`
INSERT INTO customers (email) SELECT 'c' || i || '@example.com' FROM generate_series(1, %d) i;
INSERT INTO orders (customer_id, total) SELECT 1 + i %% %d, (i %% 1000) / 10.0 FROM generate_series(1, %d) i;`, rows/10+1, rows/10+1, rows)); err != nil {
		return err
	}
	if err := exec(ctx, newURL, schema); err != nil { // the team ran its migrations on the new database
		return err
	}
	fmt.Printf("  old database: %d orders; new database: schema only\n", rows)

	step("starting 3 instances of the service with --db-url and --db-url-next")
	var nodes []*swo.Connector
	var pools []*sql.DB
	for i := 0; i < 3; i++ {
		cfg := swo.Config{NodeName: fmt.Sprintf("web-%d", i+1), Logger: log, Version: "demo"}
		fs := flag.NewFlagSet("web", flag.ContinueOnError)
		cfg.RegisterFlags(fs)
		if err := fs.Parse([]string{"--db-url=" + oldURL, "--db-url-next=" + newURL}); err != nil {
			return err
		}
		c, err := swo.NewConnector(ctx, cfg)
		if err != nil {
			return err
		}
		db := sql.OpenDB(c)
		defer db.Close()
		nodes, pools = append(nodes, c), append(pools, db)
	}
	oldPort, err := serverPort(ctx, oldURL)
	if err != nil {
		return err
	}
	w := startWriters(pools, oldPort)
	time.Sleep(2 * time.Second) // let the heartbeats go round
	printNodes(nodes[0].Status())

	step("RESET")
	if err := nodes[0].Reset(ctx); err != nil {
		return err
	}
	fmt.Printf("  state: %s\n", nodes[0].Status().State)

	step("EXECUTE (the service keeps writing)")
	stop, shown := make(chan struct{}), make(chan struct{})
	go showProgress(nodes[1], stop, shown)
	start := time.Now()
	err = nodes[1].Execute(ctx)
	close(stop)
	<-shown
	if err != nil {
		return err
	}
	s := nodes[1].Status()
	fmt.Printf("  switched in %v: sync %dms, pause %dms (final sync and commit %dms)\n",
		time.Since(start).Round(time.Millisecond), s.Timings.SyncMS, s.Timings.PauseMS, s.Timings.FinalMS)
	time.Sleep(time.Second) // the service writes on the new database
	w.stopAll()
	fmt.Printf("  the service made %d writes: %d on the old database, %d on the new, %d errors\n",
		w.total(), w.old.Load(), w.next.Load(), w.errs.Load())
	if w.errs.Load() > 0 {
		return errors.New("the service saw errors")
	}

	step("verifying the tables written only before the switch")
	rep, err := nodes[0].Verify(ctx)
	if err != nil {
		return err
	}
	for _, t := range rep.Tables {
		note := "identical"
		if !t.Equal {
			note = "differs (written after the switch)"
		}
		fmt.Printf("  %-18s %8d rows in the old database, %8d in the new: %s\n", t.Table, t.OldRows, t.NewRows, note)
	}

	step("restarting an instance on the old database alone")
	if _, err := swo.NewConnector(ctx, swo.Config{OldURL: oldURL, Logger: log}); errors.Is(err, swo.ErrObsolete) {
		fmt.Printf("  refused, as it must be:\n    %v\n", err)
	} else {
		return fmt.Errorf("the old database was not refused: %v", err)
	}
	c, err := swo.NewConnector(ctx, swo.Config{OldURL: newURL, Logger: log})
	if err != nil {
		return err
	}
	db := sql.OpenDB(c)
	defer db.Close()
	var n int
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM orders").Scan(&n); err != nil {
		return err
	}
	fmt.Printf("  restarted with --db-url=<new> only: %d orders\n", n)
	return nil
}

func step(s string) { fmt.Printf("\n== %s\n", s) }

func exec(ctx context.Context, url, query string) error {
	db, err := openPlain(ctx, url)
	if err != nil {
		return err
	}
	defer db.Close()
	_, err = db.ExecContext(ctx, query)
	return err
}

func serverPort(ctx context.Context, url string) (int, error) {
	db, err := openPlain(ctx, url)
	if err != nil {
		return 0, err
	}
	defer db.Close()
	var port int
	return port, db.QueryRowContext(ctx, "SELECT inet_server_port()").Scan(&port)
}

// openPlain opens a database handle through a normal-mode connector.
func openPlain(ctx context.Context, url string) (*sql.DB, error) {
	quiet := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	c, err := swo.NewConnector(ctx, swo.Config{OldURL: url, Logger: quiet})
	if err != nil {
		return nil, err
	}
	return sql.OpenDB(c), nil
}

func printNodes(s swo.Status) {
	fmt.Printf("  %-8s %-7s %-13s %-6s %s\n", "node", "alive", "config valid", "exec", "routing")
	for _, n := range s.Nodes {
		fmt.Printf("  %-8s %-7v %-13v %-6v %s\n", n.Name, n.Alive, n.ConfigValid, n.CanExec, n.Routing)
	}
}

// showProgress shows the run's progress until stop is closed: a bar redrawn
// in place on a terminal, plain lines otherwise. It closes done when it has
// finished its line.
func showProgress(c *swo.Connector, stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	tty := progressview.IsTerminal(os.Stdout)
	v := progressview.New(os.Stdout, tty)
	defer v.End()
	every := time.Second
	if tty {
		every = 200 * time.Millisecond
	}
	for {
		v.Show(c.Status())
		select {
		case <-stop:
			return
		case <-time.After(every):
		}
	}
}

// writers is the service's traffic: each instance writes orders continuously.
type writers struct {
	stop      chan struct{}
	wg        sync.WaitGroup
	old, next atomic.Int64
	errs      atomic.Int64
}

func startWriters(pools []*sql.DB, oldPort int) *writers {
	w := &writers{stop: make(chan struct{})}
	for _, db := range pools {
		for i := 0; i < 2; i++ {
			w.wg.Add(1)
			go func() {
				defer w.wg.Done()
				for {
					select {
					case <-w.stop:
						return
					default:
					}
					var port int
					err := db.QueryRowContext(context.Background(),
						"INSERT INTO orders (customer_id, total) VALUES (1, 9.99) RETURNING inet_server_port()").Scan(&port)
					switch {
					case err != nil:
						w.errs.Add(1)
						fmt.Fprintln(os.Stderr, "  service error:", err)
						time.Sleep(100 * time.Millisecond)
					case port == oldPort:
						w.old.Add(1)
					default:
						w.next.Add(1)
					}
				}
			}()
		}
	}
	return w
}

func (w *writers) stopAll()     { close(w.stop); w.wg.Wait() }
func (w *writers) total() int64 { return w.old.Load() + w.next.Load() }
