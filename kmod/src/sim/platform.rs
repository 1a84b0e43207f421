//! The simulator's platform: the userspace stand-ins for what the kernel gives the engine —
//! table memory in an [`Arena`], the simulated IOMMU domain, a pinner (modelled costs or real
//! `mlock`), a shared event buffer, the simulated clock and a real timer.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::rc::Rc;

use crate::event::clock::{ManualClock, MonotonicClock};
use crate::event::{Event, EventSink};
use crate::iommu::domain::IommuDomain;
use crate::sharing::pin::Pinner;
use crate::sharing::platform::Platform;
use crate::table::page_alloc::Arena;

/// The simulator's [`Platform`]: everything borrowed from one run's `'a` scope.
#[derive(Debug)]
pub struct SimPlatform<'a>(PhantomData<&'a ()>);

impl<'a> Platform for SimPlatform<'a> {
    type Alloc = &'a Arena;
    type Iommu = &'a IommuDomain<'a>;
    type Pinner = Box<dyn Pinner>;
    type Sink = SharedSink;
    type Clock = &'a ManualClock;
    type Timer = MonotonicClock;
}

/// A sink that keeps every event, shared by the engine's MMUs (cloning shares the buffer).
#[derive(Debug, Clone, Default)]
pub struct SharedSink(Rc<RefCell<Vec<Event>>>);

impl EventSink for SharedSink {
    fn emit(&mut self, event: Event) {
        self.0.borrow_mut().push(event);
    }
}

impl SharedSink {
    /// Every event so far; the buffer is left empty.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut self.0.borrow_mut())
    }
}
