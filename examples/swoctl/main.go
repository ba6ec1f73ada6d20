// Command swoctl operates a switchover for a service that uses package swo
// but has no admin page of its own. It shows the switchover cluster, runs
// the dry run, RESET and EXECUTE, and verifies the result, from a shell or
// a script:
//
//	swoctl check   --db-url=$OLD --db-url-next=$NEW   # dry run: changes nothing
//	swoctl status  --env-prefix=MYAPP                 # MYAPP_DB_URL, MYAPP_DB_URL_NEXT
//	swoctl reset   --env-prefix=MYAPP
//	swoctl execute --env-prefix=MYAPP                 # progress until the new database is live
//	swoctl verify  --env-prefix=MYAPP --json
//
// For status, reset, execute and verify it joins the cluster as a node that
// never leads (Config.APIOnly), named "swoctl-<host>"; the service's
// instances do the work. check uses swo.Check and joins nothing. Its exit
// codes (see usage) tell a script what happened. It uses only the public API
// of package swo, and never prints a password.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/pgswo/swo"
	"github.com/pgswo/swo/examples/internal/progressview"
)

// Exit codes, for scripts.
const (
	exitOK           = 0 // done
	exitUsage        = 1 // usage or configuration error (swo.ErrConfig)
	exitNotReady     = 2 // not ready, or preconditions not met; nothing was switched
	exitRunFailed    = 3 // RESET or the run failed; the service is still on the old database
	exitPauseBudget  = 4 // the run aborted on the pause budget; the service is still on the old database
	exitObsolete     = 5 // a database is obsolete, or the switch is already done
	exitDifferences  = 6 // verify found differences
	exitOtherFailure = 7 // anything else (unreachable database, timeout, interrupted)
)

const usageText = `swoctl: operate a swo switchover from a shell or a script.

Usage:
  swoctl <command> [flags]

Commands:
  status    show the cluster: state, nodes, progress, timings (--json: swo.Status)
  check     dry run of RESET's checks; joins nothing and changes neither database
  reset     RESET: cancel any run, clean up, check every node and precondition
  execute   EXECUTE: run the switchover and show its progress until every node uses
            the new database
  verify    compare every moved table and sequence between the two databases
            (--json: swo.VerifyReport)

The URLs come from the flags or from the service's environment variables
(--env-prefix=MYAPP reads MYAPP_DB_URL and MYAPP_DB_URL_NEXT; flags win).
--namespace, --exclude-tables and --allow-clear-target must be what the
service's instances use: status, reset, execute and verify join the cluster
as a node that never leads, and nodes that disagree make every node invalid.

Exit codes:
  0  ok (execute: the new database is live; a warning on standard error names
     nodes that did not confirm in time)
  1  usage or configuration error (swo.ErrConfig)
  2  not ready or preconditions not met (swo.ErrNotReady, swo.ErrPreconditions,
     swo.ErrTargetNotEmpty; also when RESET or a run failed for these): every
     problem is listed, one per line; nothing was switched
  3  RESET or the run failed (swo.ErrResetFailed, swo.ErrRunFailed): the service is
     still on the old database; RESET and EXECUTE again
  4  the run aborted because the pause budget was exceeded (swo.ErrPauseBudget):
     the service is still on the old database
  5  a database is obsolete or the switch is already done (swo.ErrObsolete,
     swo.ErrDone)
  6  verify found differences
  7  any other error (a database unreachable, --timeout, interrupted)

Flags:
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// options are the command line, parsed.
type options struct {
	cmd       string
	cfg       swo.Config
	envPrefix string
	json      bool
	timeout   optionalDuration
	verbose   bool
}

// optionalDuration is a duration flag that knows whether it was given.
type optionalDuration struct {
	d   time.Duration
	set bool
}

func (o *optionalDuration) String() string {
	if o == nil || !o.set {
		return ""
	}
	return o.d.String()
}

func (o *optionalDuration) Set(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil {
		return err
	}
	if d < 0 {
		return errors.New("negative duration")
	}
	o.d, o.set = d, true
	return nil
}

// defaultTimeouts bound each command unless --timeout says otherwise (0:
// no limit). EXECUTE and verify take as long as the data needs.
var defaultTimeouts = map[string]time.Duration{
	"status": time.Minute, "check": 10 * time.Minute, "reset": 10 * time.Minute, "execute": 0, "verify": 0,
}

// run is the command: args without the program name. It returns the exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	tty := progressview.IsTerminal(stdout)
	stdout, stderr = &lockedWriter{w: stdout}, &lockedWriter{w: stderr}
	opts, code, ok := parse(args, stderr)
	if !ok {
		return code
	}
	limit := defaultTimeouts[opts.cmd]
	if opts.timeout.set {
		limit = opts.timeout.d
	}
	if limit > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, limit)
		defer cancel()
	}
	// The command reports what the calls return; the library's own logs
	// (diagnostics, from every node's point of view) only with -v.
	level := slog.LevelError
	if opts.verbose {
		level = slog.LevelInfo
	}
	opts.cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))

	switch opts.cmd {
	case "check":
		if err := swo.Check(ctx, opts.cfg); err != nil {
			return fail(stderr, opts.cmd, err)
		}
		fmt.Fprintln(stdout, "check passed: RESET's checks find no problem; a switchover could start")
		return exitOK
	case "verify":
		rep, err := swo.Verify(ctx, opts.cfg)
		return verify(rep, err, opts.json, stdout, stderr)
	}

	host, _ := os.Hostname()
	opts.cfg.APIOnly = true
	opts.cfg.NodeName = "swoctl-" + host
	c, err := swo.NewConnector(ctx, opts.cfg)
	if err != nil {
		return fail(stderr, opts.cmd, err)
	}
	defer c.Close()
	switch opts.cmd {
	case "status":
		return status(ctx, c, opts.json, stdout)
	case "reset":
		return reset(ctx, c, stdout, stderr)
	default: // execute
		return execute(ctx, c, tty, stdout, stderr)
	}
}

// parse reads the command line: the command, then flags (flags before the
// command are accepted too). ok is false when run should return code.
func parse(args []string, stderr io.Writer) (opts options, code int, ok bool) {
	fs := flag.NewFlagSet("swoctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, usageText)
		fs.PrintDefaults()
	}
	opts.cfg.RegisterFlags(fs)
	fs.StringVar(&opts.envPrefix, "env-prefix", "", "read the URLs from `PREFIX`_DB_URL and PREFIX_DB_URL_NEXT, as the service does (flags win)")
	fs.StringVar(&opts.cfg.Namespace, "namespace", "", "the service's Config.Namespace (default \"swo\")")
	exclude := fs.String("exclude-tables", "", "the service's Config.ExcludeTables, comma-separated (`schema.table`,...)")
	fs.BoolVar(&opts.cfg.AllowClearTarget, "allow-clear-target", false, "the service's Config.AllowClearTarget")
	fs.BoolVar(&opts.json, "json", false, "status and verify: print JSON (swo.Status, swo.VerifyReport)")
	fs.Var(&opts.timeout, "timeout", "give up after this `duration`; 0: no limit (default 1m for status, 10m for check and reset, none for execute and verify)")
	fs.BoolVar(&opts.verbose, "v", false, "show the library's logs from level INFO (on standard error; default: errors only)")

	usageErr := func(format string, a ...any) (options, int, bool) {
		fmt.Fprintf(stderr, "swoctl: "+format+"\nRun 'swoctl -h' for usage.\n", a...)
		return opts, exitUsage, false
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return opts, exitOK, false
		}
		return opts, exitUsage, false // the flag package printed the error and the usage
	}
	if fs.NArg() == 0 {
		return usageErr("no command (status, check, reset, execute or verify)")
	}
	opts.cmd = fs.Arg(0)
	if _, known := defaultTimeouts[opts.cmd]; !known {
		return usageErr("unknown command %q (status, check, reset, execute or verify)", opts.cmd)
	}
	if err := fs.Parse(fs.Args()[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return opts, exitOK, false
		}
		return opts, exitUsage, false
	}
	if fs.NArg() > 0 {
		return usageErr("unexpected argument %q", fs.Arg(0))
	}
	if *exclude != "" {
		for _, t := range strings.Split(*exclude, ",") {
			if t = strings.TrimSpace(t); t != "" {
				opts.cfg.ExcludeTables = append(opts.cfg.ExcludeTables, t)
			}
		}
	}
	if opts.json && opts.cmd != "status" && opts.cmd != "verify" {
		return usageErr("--json applies to status and verify")
	}

	// The environment fills what the flags did not set.
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if opts.envPrefix != "" {
		var env swo.Config
		env.LoadEnv(opts.envPrefix)
		if !set["db-url"] {
			opts.cfg.OldURL = env.OldURL
		}
		if !set["db-url-next"] {
			opts.cfg.NextURL = env.NextURL
		}
	}
	prefix := strings.TrimSuffix(opts.envPrefix, "_")
	if opts.cfg.OldURL == "" {
		if prefix != "" {
			return usageErr("no --db-url, and %s_DB_URL is not set", prefix)
		}
		return usageErr("no --db-url (or --env-prefix)")
	}
	if opts.cfg.NextURL == "" && opts.cmd != "status" {
		if prefix != "" {
			return usageErr("%s needs the new database: no --db-url-next, and %s_DB_URL_NEXT is not set", opts.cmd, prefix)
		}
		return usageErr("%s needs the new database: --db-url-next", opts.cmd)
	}
	if err := opts.cfg.Validate(); err != nil {
		return opts, fail(stderr, opts.cmd, err), false
	}
	return opts, exitOK, true
}

// ---- status ----

func status(ctx context.Context, c *swo.Connector, asJSON bool, stdout io.Writer) int {
	s := firstView(ctx, c)
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(s); err != nil {
			return exitOtherFailure
		}
		return exitOK
	}
	printStatus(stdout, s)
	return exitOK
}

// firstView waits until this node has read the cluster once (it lists
// itself), so that a status printed right after joining is not empty. A
// node that finds the switch done, or one in normal mode, has nothing to
// read.
func firstView(ctx context.Context, c *swo.Connector) swo.Status {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		s := c.Status()
		if s.Mode != swo.ModeSwitchover || s.Routing != swo.RoutingOld ||
			slices.ContainsFunc(s.Nodes, func(n swo.NodeStatus) bool { return n.ID == s.Node.ID }) {
			return s
		}
		select {
		case <-ctx.Done():
			return s
		case <-tick.C:
		}
	}
}

func printStatus(w io.Writer, s swo.Status) {
	state := s.State.String()
	if what := stateNotes[s.State]; what != "" {
		state += " (" + what + ")"
	}
	if s.Mode == swo.ModeNormal {
		state = "no switchover configured (normal mode: no --db-url-next)"
	}
	fmt.Fprintf(w, "state:    %s\n", state)
	fmt.Fprintf(w, "routing:  %s", s.Routing)
	if s.Paused {
		fmt.Fprint(w, " (paused)")
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "old:      %s\n", describeDB(s.Old))
	if s.Next != nil {
		fmt.Fprintf(w, "next:     %s\n", describeDB(*s.Next))
	}
	if p := s.Progress; p != nil {
		fmt.Fprintf(w, "progress: %s\n", progressview.Text(p, false))
	}
	t := s.Timings
	var times []string
	for _, e := range []struct {
		what string
		at   *time.Time
	}{{"reset", t.ResetAt}, {"execute", t.ExecuteAt}, {"pause", t.PauseAt}, {"done", t.DoneAt}, {"failed", t.FailedAt}} {
		if e.at != nil {
			times = append(times, e.what+" "+e.at.Local().Format(time.DateTime))
		}
	}
	if len(times) > 0 {
		fmt.Fprintf(w, "last run: %s\n", strings.Join(times, ", "))
	}
	if t.TotalMS > 0 {
		fmt.Fprintf(w, "timings:  %s\n", timingsText(t))
	}
	if s.LastError != "" && len(s.Problems) > 0 {
		fmt.Fprintf(w, "error:    the last run's preconditions were not met: %d problem(s)\n", len(s.Problems))
		for _, p := range s.Problems {
			fmt.Fprintf(w, "  - %s\n", indent(p.String(), "    "))
		}
	} else if s.LastError != "" {
		fmt.Fprintf(w, "error:    %s\n", indent(s.LastError, "          "))
	}
	if len(s.Nodes) == 0 {
		return
	}
	fmt.Fprintln(w, "nodes:")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  NAME\tALIVE\tCONFIG\tLEADS\tROUTING\tVERSION\t")
	var invalid []string
	for _, n := range s.Nodes {
		cfg := "valid"
		if !n.ConfigValid {
			cfg = "INVALID"
			if n.ConfigError != "" {
				invalid = append(invalid, fmt.Sprintf("  %s: %s", n.Name, indent(n.ConfigError, "    ")))
			}
		}
		leads := "may lead"
		switch {
		case n.Leader:
			leads = "LEADER"
		case !n.CanExec:
			leads = "never"
		}
		name := n.Name
		if n.ID == s.Node.ID {
			name += " (this command)"
		}
		routing := string(n.Routing)
		if n.Paused {
			routing += " (paused)"
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\t\n", name, yesNo(n.Alive), cfg, leads, routing, n.Version)
	}
	tw.Flush()
	for _, line := range invalid {
		fmt.Fprintln(w, line)
	}
}

// stateNotes say what a state means for the operator.
var stateNotes = map[swo.State]string{
	swo.StateUnknown:   "no RESET since the nodes started: RESET first",
	swo.StateResetting: "RESET in progress",
	swo.StateIdle:      "ready: EXECUTE may start",
	swo.StateSyncing:   "copying and syncing; the service runs normally",
	swo.StatePausing:   "the window: new connections wait",
	swo.StateExecuting: "the window: final sync and commit",
	swo.StateDone:      "switched: restart the instances with the new database's URL only",
	swo.StateFailed:    "the service runs on the old database: RESET, fix the cause, EXECUTE again",
}

func describeDB(d swo.DatabaseStatus) string {
	out := d.Addr // never holds a password
	if d.ID != "" {
		out += " (id " + d.ID + ")"
	}
	if d.Obsolete {
		out += " OBSOLETE"
	}
	return out
}

func timingsText(t swo.Timings) string {
	return fmt.Sprintf("sync %s, pause %s (final sync and commit %s), EXECUTE to live %s",
		ms(t.SyncMS), ms(t.PauseMS), ms(t.FinalMS), ms(t.TotalMS))
}

func ms(n int64) string { return (time.Duration(n) * time.Millisecond).String() }

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func indent(s, prefix string) string { return strings.ReplaceAll(s, "\n", "\n"+prefix) }

// ---- reset ----

func reset(ctx context.Context, c *swo.Connector, stdout, stderr io.Writer) int {
	if err := c.Reset(ctx); err != nil {
		return fail(stderr, "reset", err)
	}
	s := c.Status()
	var nodes []string
	for _, n := range s.Nodes {
		if n.Alive && n.ID != s.Node.ID {
			nodes = append(nodes, n.Name)
		}
	}
	fmt.Fprintf(stdout, "RESET done: the cluster is %s; EXECUTE may start (nodes: %s)\n", s.State, strings.Join(nodes, ", "))
	return exitOK
}

// ---- execute ----

func execute(ctx context.Context, c *swo.Connector, tty bool, stdout, stderr io.Writer) int {
	if c.Status().Routing == swo.RoutingNext {
		// Execute would return nil at once: say what happened instead, as
		// reset does.
		return fail(stderr, "execute", swo.ErrDone)
	}
	done := make(chan error, 1)
	go func() { done <- c.Execute(ctx) }()
	p := progressview.New(stdout, tty)
	every := time.Second
	if tty {
		every = 200 * time.Millisecond
	}
	tick := time.NewTicker(every)
	defer tick.Stop()
	var err error
wait:
	for {
		select {
		case err = <-done:
			break wait
		case <-tick.C:
			p.Show(c.Status())
		}
	}
	p.End()
	s := c.Status()
	switch {
	case errors.Is(err, swo.ErrUnconfirmed) || err != nil && s.Routing == swo.RoutingNext:
		// The switch committed: what failed came after it (a node that did
		// not confirm in time, or this command's waiting).
		fmt.Fprintf(stderr, "swoctl execute: warning: %v\n", err)
	case err != nil:
		return fail(stderr, "execute", err)
	}
	fmt.Fprintf(stdout, "switched: the new database is live on every node (%s)\n", timingsText(s.Timings))
	next := "the new database"
	if s.Next != nil {
		next = s.Next.Addr
	}
	fmt.Fprintf(stdout, "next: restart every instance with --db-url pointing at %s, without --db-url-next; the old database is obsolete\n", next)
	return exitOK
}

// ---- verify ----

func verify(rep swo.VerifyReport, err error, asJSON bool, stdout, stderr io.Writer) int {
	if err != nil {
		return fail(stderr, "verify", err)
	}
	if asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return exitOtherFailure
		}
	} else {
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "TABLE / SEQUENCE\tOLD\tNEW\t\t")
		for _, t := range rep.Tables {
			fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t\n", t.Table, t.OldRows, t.NewRows, sameOrNot(t.Equal))
		}
		for _, s := range rep.Sequences {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t\n", s.Sequence, s.Old, s.New, sameOrNot(s.Equal))
		}
		tw.Flush()
		fmt.Fprintln(stdout, rep.String())
	}
	if !rep.Equal {
		fmt.Fprintln(stderr, "swoctl verify: the databases differ (verify compares current contents: run it right after the switch, "+
			"or on tables the service no longer writes to)")
		return exitDifferences
	}
	return exitOK
}

func sameOrNot(equal bool) string {
	if equal {
		return "equal"
	}
	return "DIFFERS"
}

// ---- errors ----

// exitCode maps an error of the library to the exit code a script branches
// on. The most specific cause comes first: a failed run wraps ErrRunFailed
// and its cause (the pause budget, the preconditions, …).
func exitCode(err error) int {
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, swo.ErrPauseBudget):
		return exitPauseBudget
	case errors.Is(err, swo.ErrConfig):
		return exitUsage
	case errors.Is(err, swo.ErrObsolete), errors.Is(err, swo.ErrDone):
		return exitObsolete
	case errors.Is(err, swo.ErrPreconditions), errors.Is(err, swo.ErrTargetNotEmpty), errors.Is(err, swo.ErrNotReady):
		return exitNotReady
	case errors.Is(err, swo.ErrRunFailed), errors.Is(err, swo.ErrResetFailed):
		return exitRunFailed
	}
	return exitOtherFailure
}

// fail prints err (the library's errors hold no password), every problem
// of a *swo.PreconditionError on a line of its own, and what to do; it
// returns the exit code.
func fail(stderr io.Writer, cmd string, err error) int {
	code := exitCode(err)
	var pe *swo.PreconditionError
	if errors.As(err, &pe) {
		head, _, _ := strings.Cut(err.Error(), "\n")
		fmt.Fprintf(stderr, "swoctl %s: %s\n", cmd, strings.TrimSuffix(head, ":"))
		for _, p := range pe.Problems {
			fmt.Fprintf(stderr, "  - %s\n", indent(p.String(), "    "))
		}
	} else {
		fmt.Fprintf(stderr, "swoctl %s: %v\n", cmd, err)
	}
	if h := hint(cmd, err, code); h != "" {
		fmt.Fprintln(stderr, h)
	}
	return code
}

// hint says what to do after err.
func hint(cmd string, err error, code int) string {
	if code == exitOtherFailure && (errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)) {
		if cmd == "execute" {
			return "stopped waiting (--timeout or interrupted): a run that started goes on without this command " +
				"(RESET cancels it); 'swoctl status' shows it"
		}
		return "gave up waiting (--timeout or interrupted)"
	}
	switch code {
	case exitNotReady:
		if errors.Is(err, swo.ErrNotReady) {
			return "nothing was switched: RESET first, and make every node show a valid configuration ('swoctl status')"
		}
		return "nothing was switched: fix every problem listed, then RESET (and EXECUTE)"
	case exitRunFailed:
		return "the service is still on the old database and nothing is lost: fix the cause, then RESET and EXECUTE again"
	case exitPauseBudget:
		return "the service's transactions or connections on the old database did not finish within the pause budget " +
			"(Config.PauseBudget; the sessions are named above). The service is still on the old database: end or shorten them, " +
			"then RESET and EXECUTE again"
	case exitObsolete:
		if errors.Is(err, swo.ErrDone) {
			return "the switch is done: restart every instance with --db-url pointing at the new database, without --db-url-next"
		}
		return "that database was switched away from: use the URL of the database now live"
	}
	return ""
}

// ---- output ----

// lockedWriter serialises writes: the library logs from its goroutines.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
