package swo_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net/http"
	"os"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgswo/swo"
)

// A database/sql service opens its *sql.DB through a connector. With both
// URLs the instance is a node of the switchover; with OldURL alone, a thin
// pass-through that refuses a database that was switched away from.
func ExampleNewConnector() {
	ctx := context.Background()
	c, err := swo.NewConnector(ctx, swo.Config{
		OldURL:  "postgres://app:secret@db1.internal:5432/app",
		NextURL: "postgres://app:secret@db2.internal:5432/app", // only for the time of a move
	})
	if errors.Is(err, swo.ErrObsolete) {
		log.Fatalf("start with --db-url pointing at the new database: %v", err)
	}
	if err != nil {
		log.Fatal(err) // never holds a password
	}
	db := sql.OpenDB(c) // db.Close closes the connector too
	defer db.Close()

	var orders int
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM orders").Scan(&orders); err != nil {
		log.Fatal(err)
	}
	fmt.Println(orders, "orders")
}

// A pgx-native service opens pools from the connector. The pool's own
// settings and hooks are kept; where its connections go is the connector's.
func ExampleConnector_OpenPool() {
	ctx := context.Background()
	var cfg swo.Config
	cfg.LoadEnv("MYAPP") // MYAPP_DB_URL, MYAPP_DB_URL_NEXT
	c, err := swo.NewConnector(ctx, cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close() // after the pool

	poolCfg, err := pgxpool.ParseConfig("pool_max_conns=20 pool_max_conn_idle_time=5m")
	if err != nil {
		log.Fatal(err)
	}
	pool, err := c.OpenPool(ctx, poolCfg) // or nil: OldURL's pool_* parameters
	if err != nil {
		log.Fatal(err)
	}
	defer pool.Close()

	if _, err := pool.Exec(ctx, "UPDATE orders SET status = 'paid' WHERE id = $1", 42); err != nil {
		log.Fatal(err)
	}
}

// The URLs come from the service's environment, and flags override them.
// The usage text (-h) shows the defaults without their passwords.
func ExampleConfig_LoadEnv() {
	os.Setenv("MYAPP_DB_URL", "postgres://app:s3cret@db1.internal:5432/app")
	os.Setenv("MYAPP_DB_URL_NEXT", "postgres://app:s3cret@db2.internal:5432/app")
	defer os.Unsetenv("MYAPP_DB_URL")
	defer os.Unsetenv("MYAPP_DB_URL_NEXT")

	var cfg swo.Config
	cfg.LoadEnv("MYAPP") // first: the flags' defaults
	fs := flag.NewFlagSet("myapp", flag.ContinueOnError)
	cfg.RegisterFlags(fs)
	fs.SetOutput(os.Stdout)
	fs.PrintDefaults()

	if err := fs.Parse([]string{"--db-url-next=postgres://app:0ther@db3.internal:5432/app"}); err != nil {
		log.Fatal(err)
	}
	fmt.Println("next:", fs.Lookup("db-url-next").Value)
	// Output:
	//   -db-url value
	//     	PostgreSQL URL of the current database (default postgres://app:xxxxx@db1.internal:5432/app)
	//   -db-url-next value
	//     	PostgreSQL URL of the database to switch over to (enables switchover mode) (default postgres://app:xxxxx@db2.internal:5432/app)
	// next: postgres://app:xxxxx@db3.internal:5432/app
}

// RegisterFlags binds --db-url and --db-url-next to the configuration;
// Validate checks it without connecting.
func ExampleConfig_RegisterFlags() {
	var cfg swo.Config
	fs := flag.NewFlagSet("myapp", flag.ContinueOnError)
	cfg.RegisterFlags(fs)
	err := fs.Parse([]string{
		"--db-url=postgres://app:s3cret@db1.internal:5432/app",
		"--db-url-next=postgres://app:s3cret@db2.internal:5432/app",
	})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(fs.Lookup("db-url").Value) // what a log line or -h would show
	fmt.Println(cfg.Validate())
	// Output:
	// postgres://app:xxxxx@db1.internal:5432/app
	// <nil>
}

// Configuration errors wrap ErrConfig, name the field and its flag, and
// hold no password.
func ExampleConfig_Validate() {
	for _, cfg := range []swo.Config{
		{OldURL: "postgres://app:s3cret@db1.internal:5432/"},
		{OldURL: "postgres://app:s3cret@db1.internal:5432/app", Namespace: "My-App"},
	} {
		err := cfg.Validate()
		fmt.Println(errors.Is(err, swo.ErrConfig), err)
	}
	// Output:
	// true swo: invalid configuration: Config.OldURL (--db-url): invalid database URL postgres://app:xxxxx@db1.internal:5432/: no database name
	// true swo: invalid configuration: Config.Namespace "My-App": use 1 to 31 lower-case letters, digits or _, not starting with a digit
}

// A service's CI keeps its schema switchable: after the migrations, Check
// runs RESET's checks against a copy of the database and an empty migrated
// one, and changes neither. In a test, report each problem with t.Errorf.
func ExampleCheck() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	err := swo.Check(ctx, swo.Config{
		OldURL:  os.Getenv("CI_DB_URL"),      // migrated, with test data
		NextURL: os.Getenv("CI_DB_URL_NEXT"), // migrated, empty
		// The settings the service runs with:
		ExcludeTables: []string{"audit.*"},
	})
	var pe *swo.PreconditionError
	switch {
	case errors.As(err, &pe):
		for _, p := range pe.Problems {
			fmt.Printf("not switchable: %s: %s\n", p.Object, p.Issue)
		}
		os.Exit(1)
	case err != nil:
		log.Fatal(err) // a configuration (ErrConfig) or connection error
	}
	fmt.Println("the schema can be switched over")
}

// The operator's RESET and EXECUTE on the service's admin surface (behind
// its own authentication). Errors say what to do: test them with errors.Is
// and errors.As; they never hold a password.
func ExampleConnector_Execute() {
	c, err := swo.NewConnector(context.Background(), swo.Config{
		OldURL: os.Getenv("MYAPP_DB_URL"), NextURL: os.Getenv("MYAPP_DB_URL_NEXT"),
	})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	mux := http.NewServeMux()
	mux.HandleFunc("POST /admin/switchover/reset", func(w http.ResponseWriter, r *http.Request) {
		answer(w, c.Reset(r.Context()))
	})
	mux.HandleFunc("POST /admin/switchover/execute", func(w http.ResponseWriter, r *http.Request) {
		// EXECUTE takes as long as the copy: cancelling r's context stops the
		// waiting, not the run (RESET cancels a run).
		answer(w, c.Execute(r.Context()))
	})
	mux.HandleFunc("GET /admin/switchover", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(c.Status()) // see ExampleStatus
	})
	// The buttons are POSTs from a browser: refuse cross-origin requests.
	log.Fatal(http.ListenAndServe("localhost:8081", http.NewCrossOriginProtection().Handler(mux)))
}

// answer reports the outcome of RESET or EXECUTE, the most specific cause
// first: a failed run wraps ErrRunFailed and its cause.
func answer(w http.ResponseWriter, err error) {
	var pe *swo.PreconditionError
	reply := struct {
		Error    string        `json:"error,omitempty"`
		Problems []swo.Problem `json:"problems,omitempty"`
		Do       string        `json:"do,omitempty"`
	}{}
	code := http.StatusOK
	switch {
	case err == nil:
	case errors.As(err, &pe):
		code, reply.Problems, reply.Do = http.StatusConflict, pe.Problems, "fix every problem, then RESET"
	case errors.Is(err, swo.ErrPauseBudget):
		code, reply.Do = http.StatusConflict, "long transactions on the old database (named in the error): end them, then RESET and EXECUTE"
	case errors.Is(err, swo.ErrNotReady):
		code, reply.Do = http.StatusConflict, "RESET first; every node must show a valid configuration"
	case errors.Is(err, swo.ErrUnconfirmed): // the switch committed
		code, reply.Do = http.StatusOK, "the new database is live: check the nodes named, then restart every instance with its URL only"
	case errors.Is(err, swo.ErrTargetNotEmpty):
		code, reply.Do = http.StatusConflict, "the new database holds other rows: point NextURL at the right database, or empty the tables named, then RESET"
	case errors.Is(err, swo.ErrDone):
		code, reply.Do = http.StatusConflict, "restart the instances with the new database's URL only"
	case errors.Is(err, swo.ErrRunFailed), errors.Is(err, swo.ErrResetFailed):
		code, reply.Do = http.StatusInternalServerError, "the service is still on the old database: RESET and EXECUTE again"
	default:
		code = http.StatusInternalServerError
	}
	if err != nil {
		reply.Error = err.Error()
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(reply)
}

// Status is what a switchover page shows; its JSON field names are stable
// and every duration is in milliseconds. A client reads it back:
func ExampleStatus() {
	body := `{"mode": "switchover", "state": "syncing", "routing": "old",
		"progress": {"phase": "initial copy", "table": "public.orders", "rows_done": 50000, "rows_total": 200000, "eta_ms": 3000},
		"timings": {}}`
	var s swo.Status
	if err := json.Unmarshal([]byte(body), &s); err != nil {
		log.Fatal(err)
	}
	if s.State.Running() && s.Progress != nil {
		p := s.Progress
		fmt.Printf("%s: %s %s, %d of %d rows, ETA %v\n", s.State, p.Phase, p.Table, p.RowsDone, p.RowsTotal,
			time.Duration(p.ETAMS)*time.Millisecond)
	}
	// Output:
	// syncing: initial copy public.orders, 50000 of 200000 rows, ETA 3s
}

// Status is a snapshot (at most a heartbeat old) of this node and its
// cluster; it does not touch the databases.
func ExampleConnector_Status() {
	c, err := swo.NewConnector(context.Background(), swo.Config{
		OldURL: os.Getenv("MYAPP_DB_URL"), NextURL: os.Getenv("MYAPP_DB_URL_NEXT"),
	})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	s := c.Status()
	for _, n := range s.Nodes {
		fmt.Printf("%s alive=%v config valid=%v %s\n", n.Name, n.Alive, n.ConfigValid, n.ConfigError)
	}
	out, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(out)) // passwords never appear: Old.Addr is user@host:port/database
}

// The errors of RESET and EXECUTE keep their identity through the wrapping,
// whichever node met them.
func ExamplePreconditionError() {
	// As Reset might return it:
	err := fmt.Errorf("swo: %w: %w", swo.ErrResetFailed, &swo.PreconditionError{Problems: []swo.Problem{
		{Object: "public.events", Issue: "has no primary key"},
		{Object: "public.orders.note", Issue: "column missing in the new database"},
	}})
	fmt.Println(errors.Is(err, swo.ErrResetFailed), errors.Is(err, swo.ErrPreconditions))
	var pe *swo.PreconditionError
	if errors.As(err, &pe) {
		for _, p := range pe.Problems {
			fmt.Println(p)
		}
	}
	// Output:
	// true true
	// public.events: has no primary key
	// public.orders.note: column missing in the new database
}

// Right after the switch, Verify compares the moved tables and sequences of
// the two databases (row counts and digests, computed in the databases).
func ExampleConnector_Verify() {
	ctx := context.Background()
	c, err := swo.NewConnector(ctx, swo.Config{
		OldURL: os.Getenv("MYAPP_DB_URL"), NextURL: os.Getenv("MYAPP_DB_URL_NEXT"), APIOnly: true,
	})
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()
	rep, err := c.Verify(ctx)
	if err != nil {
		log.Fatal(err)
	}
	for _, d := range rep.Differences() {
		fmt.Printf("%s: %d rows in the old database, %d in the new\n", d.Table, d.OldRows, d.NewRows)
	}
	fmt.Println(rep) // "12 tables and 3 sequences identical", or what differs
}
