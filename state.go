package swo

import "fmt"

// State is the state of a switchover cluster. Every node derives it from the
// message log in the old database, so every node agrees on it.
type State int

// The states, in the order of a successful run.
const (
	StateUnknown   State = iota // nothing known yet: no RESET since the nodes started, or the log is unreadable
	StateResetting              // RESET in progress: cancelling, cleaning up, checking every node and precondition
	StateIdle                   // checked and ready: EXECUTE may start
	StateSyncing                // initial copy and incremental sync running; the service runs normally
	StatePausing                // application connections to the old database are being drained
	StateExecuting              // stop-the-world: final sync and commit of the switch
	StateDone                   // switched: the new database is live, the old one obsolete
	StateFailed                 // the last RESET or EXECUTE failed; the service runs on the old database
)

var stateNames = [...]string{
	StateUnknown:   "unknown",
	StateResetting: "resetting",
	StateIdle:      "idle",
	StateSyncing:   "syncing",
	StatePausing:   "pausing",
	StateExecuting: "executing",
	StateDone:      "done",
	StateFailed:    "failed",
}

// States lists every state.
func States() []State {
	s := make([]State, len(stateNames))
	for i := range s {
		s[i] = State(i)
	}
	return s
}

// String returns the lower-case name of the state.
func (s State) String() string {
	if s < 0 || int(s) >= len(stateNames) {
		return fmt.Sprintf("State(%d)", int(s))
	}
	return stateNames[s]
}

// MarshalText renders the state by name, so Status serialises as "idle", not 2.
func (s State) MarshalText() ([]byte, error) {
	if s < 0 || int(s) >= len(stateNames) {
		return nil, fmt.Errorf("swo: invalid state %d", int(s))
	}
	return []byte(s.String()), nil
}

// UnmarshalText parses a state name.
func (s *State) UnmarshalText(b []byte) error {
	for i, n := range stateNames {
		if n == string(b) {
			*s = State(i)
			return nil
		}
	}
	return fmt.Errorf("swo: unknown state %q", b)
}

// transitions lists, for each state, the states it may move to. RESET may
// start from anywhere but done (a completed switch is not undone: the old
// database is obsolete); any running state may fail (errors, timeouts, a lost
// leader); a run moves strictly forward.
var transitions = map[State][]State{
	StateUnknown:   {StateResetting, StateDone, StateFailed},
	StateResetting: {StateResetting, StateIdle, StateFailed},
	StateIdle:      {StateResetting, StateSyncing, StateFailed},
	StateSyncing:   {StateResetting, StatePausing, StateFailed},
	StatePausing:   {StateResetting, StateExecuting, StateFailed},
	StateExecuting: {StateResetting, StateDone, StateFailed},
	StateDone:      {},
	StateFailed:    {StateResetting, StateFailed},
}

// CanTransition reports whether the state machine allows moving from s to next.
func (s State) CanTransition(next State) bool {
	for _, t := range transitions[s] {
		if t == next {
			return true
		}
	}
	return false
}

// Running reports whether an execution is under way in s.
func (s State) Running() bool {
	return s == StateSyncing || s == StatePausing || s == StateExecuting
}
