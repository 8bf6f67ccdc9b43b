//! Draining a queue's available ring into its used ring.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::VirtioInterrupt;

/// Errors that leave a queue unusable until the driver resets the device.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available ring could not be read, or its index moved further than the queue size
    /// since the device last looked.
    #[error("Available ring is unusable")]
    AvailableRing(#[source] virtio_queue::Error),
    /// A used ring entry could not be written (for example, a head index beyond the queue).
    #[error("Failed to return descriptor chain {head} to the used ring")]
    UsedRing {
        head: u16,
        #[source]
        source: virtio_queue::Error,
    },
    /// The notification suppression fields could not be accessed.
    #[error("Failed to access the queue's notification fields")]
    Notification(#[source] virtio_queue::Error),
    /// A buffer checked to lie in guest memory could not be written.
    #[error("Failed to write a buffer in guest memory")]
    BufferWrite(#[source] vm_memory::GuestMemoryError),
}

/// Hands every chain the driver made available on `queue` to `handle_chain`, which returns how
/// many bytes it wrote into the chain's buffers, puts each chain in the used ring, and raises
/// the interrupt if the driver wants one.
///
/// Notifications from the driver are suppressed while the ring is being drained, and the ring
/// is checked once more after re-enabling them so that no buffer made available in between is
/// missed.
pub(crate) fn process_available<F>(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    interrupt: &VirtioInterrupt,
    mut handle_chain: F,
) -> Result<(), QueueError>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    if !queue.ready() {
        return Ok(());
    }
    let mut used_any = false;
    let result = loop {
        if let Err(source) = queue.disable_notification(memory) {
            break Err(QueueError::Notification(source));
        }
        if let Err(error) = drain(queue, memory, &mut handle_chain, &mut used_any) {
            break Err(error);
        }
        match queue.enable_notification(memory) {
            Ok(true) => continue,
            Ok(false) => break Ok(()),
            Err(source) => break Err(QueueError::Notification(source)),
        }
    };
    // Whatever happened, the buffers already returned must be announced.
    if used_any {
        match queue.needs_notification(memory) {
            Ok(true) => interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(source) => {
                interrupt.signal_used_queue();
                return result.and(Err(QueueError::Notification(source)));
            }
        }
    }
    result
}

fn drain<F>(
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    handle_chain: &mut F,
    used_any: &mut bool,
) -> Result<(), QueueError>
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    loop {
        let chain = match queue.iter(memory) {
            Ok(mut available) => available.next(),
            Err(source) => return Err(QueueError::AvailableRing(source)),
        };
        let Some(chain) = chain else {
            return Ok(());
        };
        let head = chain.head_index();
        let written = handle_chain(chain);
        queue
            .add_used(memory, head, written)
            .map_err(|source| QueueError::UsedRing { head, source })?;
        *used_any = true;
    }
}
